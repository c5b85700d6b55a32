"""4-bit experts at generation time: only the experts that tokens are routed to are multiplied, one at a time,
in quantized form, and the model computes what the same model with dequantized expert weights computes.

Models: the bundled zoo merged into a Mixtral, and tiny random Mixtral, Qwen2-MoE and Qwen3-MoE models
(tests/conftest.py builds them).
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from bitsandbytes.functional import _convert_weight_packed_for_cpu, dequantize_4bit, has_avx512bf16, quantize_4bit
from torch import nn
from torch.nn.utils import parametrize
from torch.utils._python_dispatch import TorchDispatchMode

from studio.inspect.chat import load_chat_model
from studio.inspect.quantize import CPU_ROW_BLOCK, _cpu_kernel_order, _plain_order

from helpers import FAMILIES, TEXT, expert_modules

pytestmark = pytest.mark.usefixtures("single_thread")
ROLES = ("gate_up_proj", "down_proj")


class BitsAndBytesCalls(TorchDispatchMode):
    """The shape argument of every bitsandbytes 4-bit call (fused multiply, matmul or dequantization)."""

    def __init__(self):
        super().__init__()
        self.shapes: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "bitsandbytes":
            shape = next(a for a in args if isinstance(a, (list, tuple, torch.Size)))
            self.shapes[tuple(shape)] += 1
        return func(*args, **(kwargs or {}))


def routed_experts(model, ids: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits of one forward, and the experts each token was routed to in each MoE layer ([tokens, top k])."""
    routed, handles = [], []
    for module in model.modules():
        if type(module).__name__.endswith("TopKRouter"):
            handles.append(module.register_forward_hook(lambda m, a, out: routed.append(out[2].sort(-1).values)))
    try:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits.float()[0]
    finally:
        for handle in handles:
            handle.remove()
    return logits, routed


@pytest.mark.parametrize("ids", [[1, 17, 42, 99, 200, 7], [1]], ids=["prompt", "one token"])
def test_only_the_routed_experts_are_multiplied_one_by_one(zoo_moe, ids):
    chat = load_chat_model(zoo_moe, "4bit", "cpu")
    experts = expert_modules(chat.model)
    shapes = {tuple(getattr(experts[0], role).shape[1:]) for role in ROLES}
    with BitsAndBytesCalls() as calls:
        _, routed = routed_experts(chat.model, ids)
    assert len(routed) == len(experts) == 4
    used = [set(layer.flatten().tolist()) for layer in routed]
    assert sum(calls.shapes[shape] for shape in shapes) == 2 * sum(len(layer) for layer in used)
    if len(ids) == 1:  # one token: its top 2 experts of 4 in each layer, nothing else
        assert all(len(layer) == 2 for layer in used)
    assert not [shape for shape in calls.shapes if len(shape) == 3], "a whole layer's experts were dequantized"


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_output_equals_the_dequantized_weights_model(tiny_moes, zoo_moe, family):
    """The reference: the same 4-bit model (attention in 4-bit too) with each expert tensor replaced by
    bitsandbytes' own quantize-then-dequantize of the bf16 checkpoint tensor, run by transformers' default
    experts forward."""
    path = zoo_moe if family == "mixtral" else tiny_moes[family]
    nf4, bf16 = (load_chat_model(path, precision, "cpu") for precision in ("4bit", "bf16"))
    ids = nf4.encode(TEXT)
    quantized, routed = routed_experts(nf4.model, ids)
    for name, module in nf4.model.named_modules():
        if parametrize.is_parametrized(module):
            for role in ROLES:
                weight, state = quantize_4bit(getattr(bf16.model.get_submodule(name), role).data, quant_type="nf4")
                parametrize.remove_parametrizations(module, role, leave_parametrized=False)
                setattr(module, role, nn.Parameter(dequantize_4bit(weight, state), requires_grad=False))
    nf4.model.set_experts_implementation("grouped_mm")
    reference, reference_routed = routed_experts(nf4.model, ids)
    same = torch.stack([(a == b).all(-1) for a, b in zip(routed, reference_routed)]).all(0)
    # A token whose router is near a tie may pick another expert under any rounding (one of 70 here, in one
    # family); every other token must get the same numbers, bf16 rounding apart (bitsandbytes' fused CPU kernel
    # reads its scales in bf16 and sums in its own order): the 4-bit model's own distance to bf16 is ~20x larger.
    assert same.float().mean() >= 0.95
    error = (quantized - reference).norm(dim=-1) / reference.norm(dim=-1)
    assert error[same].max() < 0.02, error


def test_kernel_order_is_bitsandbytes_own():
    weight = torch.randn(3 * CPU_ROW_BLOCK, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    data, state = quantize_4bit(weight, quant_type="nf4")
    ours = _cpu_kernel_order(data.view(weight.shape[0], -1))
    theirs, _ = _convert_weight_packed_for_cpu(data.clone(), state)
    assert torch.equal(ours, theirs)
    assert torch.equal(_plain_order(ours), data.view(weight.shape[0], -1))  # and back, for whole-tensor reads


@pytest.mark.skipif(not has_avx512bf16(), reason="bitsandbytes has no fused 4-bit kernel for this CPU")
def test_experts_use_the_fused_cpu_kernel_where_there_is_one(zoo_moe):
    chat = load_chat_model(zoo_moe, "4bit", "cpu")
    for module in expert_modules(chat.model):
        for role in ROLES:
            codec = module.parametrizations[role][0]
            assert all(state.packing_format_for_cpu for state in codec.experts)
            assert codec.quant_state.absmax.dtype == torch.bfloat16


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the check runs in full (minutes)")
def test_the_gpu_check_says_plainly_that_there_is_no_gpu():
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py")], capture_output=True,
                          text=True, cwd=root, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "No CUDA GPU" in proc.stdout and "--device cpu" in proc.stdout
