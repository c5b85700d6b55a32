"""Chat and routing read every MoE family transformers ships, from tiny checkpoints in their published layouts.

For each family (tests/moe_families.py) the model is loaded as chat loads it, at fp32, bf16 and 4-bit, and one
forward is recorded twice: by RouterCapture, and by hooks of this test on the experts module of each MoE layer,
which is called with the experts the model really runs and their weights. The trace must name exactly those
experts with exactly those weights, and its probabilities must be the ones those weights come from: the chosen
experts' weights are a constant multiple of their probabilities (renormalised, scaled, or as they are).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch

from moe_families import build_family, family_names, saved_config
from studio.inspect.chat import ChatSettings, load_chat_model
from studio.inspect.routing import RouterCapture
from studio.moe_layouts import layout_of

IDS = [1, 17, 42, 99, 200, 7, 300, 5, 383, 64, 2, 11]
# Weights that are not a constant multiple of the probabilities: Gemma 4 scales each expert by its own factor,
# ZAYA gives its skip expert weight 0, PhiMoE weighs by its sparsemixer (a softmax over the logits left in range).
PER_EXPERT_WEIGHTS = {"gemma4_text", "zaya", "phimoe"}
# Families without an experts module called with the choice: the model runs the top k of its logits (Doge's
# logits: the sums of its product keys).
CHOICE_BY_TOP_K = {"llama4_text", "jetmoe", "doge"}
READABLE = list(family_names())
# A two-layer Qwen4-Exp has no attention layer (only its indexed-attention layers hold a cache that counts tokens),
# and transformers' own generate stops at that; its routing is checked on a plain forward above.
NO_GENERATION = {"qwen4_exp_text"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built = {}

    def checkpoint(family: str):
        if family not in built:
            built[family] = build_family(family, root / family)
        return built[family]

    return checkpoint


@pytest.fixture(scope="module")
def loaded(checkpoints):
    """The chat model of a family at a precision, loaded once for the tests of this module."""
    models = {}

    def load(family: str, precision: str):
        if (family, precision) not in models:
            models[family, precision] = load_chat_model(checkpoints(family), precision, "cpu")
        return models[family, precision]

    return load


@contextmanager
def experts_run(model) -> Iterator[dict[int, list]]:
    """Hooks on every `layers.N...experts` module: the (experts, weights) it is called with, per layer."""
    runs: dict[int, list] = {}
    handles = []
    for name, module in model.named_modules():
        match = re.search(r"(?:layers|blocks)\.(\d+)\.(?:.+\.)?experts$", name)
        if match and not isinstance(module, torch.nn.ModuleList):
            def record(module, args, kwargs, layer=int(match[1])):
                tensors = [t for t in (*args[1:], *kwargs.values()) if isinstance(t, torch.Tensor)]
                indices = [t for t in tensors if not t.is_floating_point()]
                weights = [t for t in tensors if t.is_floating_point()]
                if indices and weights:
                    runs.setdefault(layer, []).append((indices[0].reshape(len(IDS), -1).long(),
                                                       weights[0].reshape(len(IDS), -1).float()))
            handles.append(module.register_forward_pre_hook(record, with_kwargs=True))
    try:
        yield runs
    finally:
        for handle in handles:
            handle.remove()


def recorded(chat):
    with torch.no_grad(), experts_run(chat.model) as runs, RouterCapture(chat.model) as capture:
        chat.model(input_ids=torch.tensor([IDS]), use_cache=False)
    return capture.trace(IDS, [str(i) for i in IDS], 5, chat.labels), runs


def by_expert(experts: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    order = experts.argsort(dim=-1, stable=True)
    return experts.gather(-1, order), weights.gather(-1, order)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "4bit"])
@pytest.mark.parametrize("family", READABLE)
def test_trace_names_the_experts_the_model_runs(loaded, family, precision):
    chat = loaded(family, precision)
    trace, runs = recorded(chat)
    assert trace.probabilities.shape[1:] == (len(IDS), len(chat.labels))
    for position, layer in enumerate(trace.layers):
        experts, weights = by_expert(trace.experts[position], trace.weights[position])
        if family in CHOICE_BY_TOP_K:
            top = trace.probabilities[position].topk(trace.top_k, dim=-1).indices.sort(dim=-1).values
            assert torch.equal(experts, top), (family, layer)
        else:
            assert len(runs[layer]) == 1, (family, layer)
            run_experts, run_weights = by_expert(*runs[layer][0])
            assert torch.equal(experts, run_experts), (family, layer)
            torch.testing.assert_close(weights, run_weights, atol=1e-5, rtol=0)
        if family not in PER_EXPERT_WEIGHTS:
            chosen = trace.probabilities[position].gather(-1, experts)
            ratio = weights / chosen
            torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio), atol=0, rtol=1e-4 if precision == "fp32"
                                       else 2e-2)
        if layout_of(chat.model.config).scoring == "softmax":
            sums = trace.probabilities[position].sum(dim=-1)
            torch.testing.assert_close(sums, torch.ones_like(sums))


@pytest.mark.parametrize("family", READABLE)
def test_every_fused_expert_tensor_is_quantized_in_4bit(loaded, family):
    chat = loaded(family, "4bit")
    fused = [name for name, param in chat.model.named_parameters()
             if param.dim() == 3 and ".experts." in name and param.is_floating_point()]
    assert not fused, fused


@pytest.mark.parametrize("family", [name for name in READABLE if name not in NO_GENERATION])
def test_chat_answers_and_records_its_routing_in_4bit(loaded, family):
    chat = loaded(family, "4bit")
    reply = chat.reply([{"role": "user", "content": "hello"}], ChatSettings(temperature=0, max_new_tokens=2))
    assert reply.new_tokens == 2
    assert reply.trace.probabilities.shape[1:] == (len(reply.trace.tokens), len(chat.labels))


def test_trace_lists_the_chosen_experts_best_first(loaded):
    trace, _ = recorded(loaded("deepseek_v3", "fp32"))
    assert torch.equal(trace.weights, trace.weights.sort(dim=-1, descending=True).values)


def test_gpt_oss_mxfp4_experts_are_dequantised_as_transformers_dequantises_them(checkpoints, loaded):
    """The published layout keeps gpt-oss's experts as MXFP4 blocks and scales; transformers dequantises them on
    the CPU itself, and chat's streamed loading must give exactly the same bf16 experts."""
    from transformers import AutoModelForCausalLM

    folder = checkpoints("gpt_oss")
    assert saved_config(folder)["quantization_config"]["quant_method"] == "mxfp4"
    own = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    chat = loaded("gpt_oss", "bf16")
    for layer, expected in zip(chat.model.model.layers, own.model.layers):
        for name in ("gate_up_proj", "down_proj"):
            assert torch.equal(getattr(layer.mlp.experts, name), getattr(expected.mlp.experts, name)), name


@pytest.mark.parametrize("family", ["llama4_text", "dbrx", "longcat_flash", "gpt_oss", "deepseek_v3"])
def test_eval_routing_reads_the_family(checkpoints, loaded, family):
    from studio.inspect.evaluate import evaluate_routing

    report = evaluate_routing(checkpoints(family), {0: ["def add(a, b):", "import os"], 1: ["12 + 7 = 19"]})
    chat = loaded(family, "fp32")
    assert report.labels == chat.labels
    layers = len(report.same_expert_rate)
    assert [sum(row) for row in report.confusion] == [2 * layers, 1 * layers]


def test_a_wrappers_expert_count_is_checked_against_its_routers(checkpoints, tmp_path):
    """The count inside `text_config` (Qwen3.5-MoE as published) is read like a plain model's."""
    import json
    import shutil

    from studio.errors import StudioError

    folder = shutil.copytree(checkpoints("qwen3_5_moe_text"), tmp_path / "liar")
    config = json.loads((folder / "config.json").read_text())
    config["text_config"]["num_experts"] = 8
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(StudioError, match=r"config.json says text_config.num_experts = 8, but the router "
                                          r"model.language_model.layers.0.mlp.gate.weight"):
        load_chat_model(folder, "fp32", "cpu")


def test_route_names_a_model_whose_routers_it_cannot_find(tmp_path, capsys):
    """Doge is also published dense (`is_moe: false`) with its expert count in config.json: no router to read."""
    from studio.app.cli import main

    folder = build_family("doge", tmp_path / "dense-doge", is_moe=False)
    code = main(["route", str(folder), "hello", "--precision", "fp32", "--device", "cpu", "--max-new-tokens", "2",
                 "--html", str(tmp_path / "route.html")])
    error = capsys.readouterr().err
    assert code == 2
    assert "No router found in DogeForCausalLM (doge)" in error and "Traceback" not in error
