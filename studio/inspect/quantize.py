"""Loading an MoE at a chosen precision, with the experts quantized too, without a full-precision copy in memory.

transformers 5 stores each layer's experts as fused 3-D parameters (`gate_up_proj`, `down_proj`), which
bitsandbytes leaves at full size: a plain "4-bit" load shrinks an MoE by about 5%. Here the weights are
streamed: every checkpoint tensor is read into memory of its own when transformers asks for it (no memory
map, whose pages would count as resident until the end), and a fused expert tensor is quantized the moment
transformers sets it on its module, one layer at a time. Attention and other linear layers go through
bitsandbytes as usual. The model in full precision never exists, so the peak while loading stays near the
final footprint plus one layer's experts. While generating, only the experts that tokens are routed to are
used, one at a time, each multiplied in its quantized form (ExpertCodec): no expert tensor of a layer is ever
rebuilt at full size.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from studio import mxfp4
from studio.devices import check_device
from studio.errors import StudioError
from studio.moe_layouts import expert_count, model_class, router_width
from studio.sources import ModelSource

# Quantizing in slices bounds the quantizer's scratch memory (bitsandbytes' CPU path needs ~7x its input, about
# 20 bytes per element): at most 1M elements (~20 MB) at once, and at most a sixteenth of the tensor, so that
# small models stay within their own loading bound too. Powers of two, so every slice holds whole quantization
# blocks and the result equals one-shot quantization.
SLICE_MAX, SLICE_MIN = 1 << 20, 1 << 12
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
CPU_ROW_BLOCK = 32  # bitsandbytes' CPU 4-bit kernel packs weight rows in blocks of this many
CPU_IN_BLOCK = 64  # and reads each row in quantization blocks of this many values


@dataclass(frozen=True)
class Precision:
    """How a precision is loaded: dtype of what stays unquantized, bitsandbytes settings, expert quantizer."""

    name: str
    dtype: torch.dtype
    bnb: dict | None = None
    experts: Callable[[torch.Tensor, str], tuple[torch.Tensor, ExpertCodec]] | None = None


class ExpertCodec(nn.Module):
    """Parametrization of a quantized fused expert tensor [experts, out, in]: the experts module reads an
    ExpertWeights view of its data, which hands each expert's matrix to the forward still quantized.

    transformers 5's eager experts forward (which quantized models use) runs only the experts that tokens are
    routed to, one at a time, as `F.linear(tokens, self.gate_up_proj[expert])`: that linear multiplies in
    quantized form where the codec can, or dequantizes that one expert; nothing of the size of a layer is made.
    """

    def __init__(self, role: str, shape: torch.Size, dtype: torch.dtype):
        super().__init__()
        self.role, self.shape, self.dtype = role, shape, dtype

    def forward(self, data: torch.Tensor) -> "ExpertWeights":
        return ExpertWeights(self, data)

    def linear(self, x: torch.Tensor, data: torch.Tensor, expert: int) -> torch.Tensor:
        """x @ W[expert].T."""
        return F.linear(x, self.dequantize(data, expert).to(x.dtype))

    def dequantize(self, data: torch.Tensor, expert: int) -> torch.Tensor:
        raise NotImplementedError

    def to_kernel_layout(self, data: torch.Tensor, transposed: bool) -> None:
        """Rearrange `data` in place for a faster kernel of this machine, once loading is done; none by default."""


class ExpertWeights:
    """What a quantized experts module reads as `gate_up_proj` or `down_proj`: indexed by an expert, that
    expert's matrix, still quantized."""

    def __init__(self, codec: ExpertCodec, data: torch.Tensor):
        self.codec, self.data = codec, data
        # Set here so that reading them never goes through __getattr__'s whole-layer dequantization.
        self.shape, self.dtype, self.device, self.ndim = codec.shape, codec.dtype, data.device, len(codec.shape)

    def __getitem__(self, expert) -> "QuantizedMatrix":
        if isinstance(expert, torch.Tensor) and expert.numel() == 1:
            expert = int(expert)
        if not isinstance(expert, int):
            raise TypeError(f"Quantized {self.codec.role} is read one expert at a time (an int index), not with "
                            f"{type(expert).__name__}; load the model at bf16 to use this experts forward.")
        return QuantizedMatrix(self.codec, self.data, expert)

    def dequantized(self) -> torch.Tensor:
        """Every expert's matrix, stacked: for the experts forwards that take the whole tensor at once (Llama 4's
        batched matmul), which then cost a full-layer dequantization, as before."""
        return torch.stack([self[e].dequantized() for e in range(self.shape[0])])

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return func(*(a.dequantized() if isinstance(a, cls) else a for a in args), **(kwargs or {}))

    def __getattr__(self, name: str):  # a tensor method called on the whole (`.transpose`, `.to`, ...)
        return getattr(self.dequantized(), name)


class QuantizedMatrix:
    """One expert's matrix in quantized form. torch's F.linear on it multiplies through its codec; any other
    torch function sees the dequantized matrix (so that every experts forward computes what it computes at full
    precision)."""

    def __init__(self, codec: ExpertCodec, data: torch.Tensor, expert: int):
        self.codec, self.data, self.expert = codec, data, expert

    def dequantized(self) -> torch.Tensor:
        return self.codec.dequantize(self.data, self.expert)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and isinstance(args[1], cls):
            x, weight, bias = args[0], args[1], (args[2] if len(args) > 2 else kwargs.get("bias"))
            if not x.numel():  # an expert no token was routed to (JetMoE calls every one); bitsandbytes' CPU
                # kernel dies with a floating point exception on an empty input
                return x.new_zeros(*x.shape[:-1], weight.codec.shape[1])
            out = weight.codec.linear(x, weight.data, weight.expert)
            return out if bias is None else out + bias
        return func(*(a.dequantized() if isinstance(a, cls) else a for a in args), **kwargs)


class Nf4(ExpertCodec):
    """NF4 blocks, each expert on its own, multiplied by bitsandbytes' 4-bit matmul: on a GPU its kernel for one
    token and a dequantization of the one expert for longer inputs; on a CPU, its fused kernel where it has one
    (AVX512-BF16, on the layout that kernel reads: see to_kernel_layout), else a dequantization of the expert."""

    def __init__(self, role: str, state):
        super().__init__(role, state.shape, state.dtype)
        self.quant_state = state
        self.experts = [self._expert_state(state.absmax, e) for e in range(self.shape[0])]

    def _expert_state(self, absmax: torch.Tensor, expert: int, packed: bool = False):
        from bitsandbytes.functional import QuantState

        blocks = -(-self.shape[1] * self.shape[2] // self.quant_state.blocksize)
        state = QuantState(absmax=absmax[expert * blocks:(expert + 1) * blocks], shape=self.shape[1:],
                           code=self.quant_state.code, blocksize=self.quant_state.blocksize,
                           quant_type=self.quant_state.quant_type, dtype=self.quant_state.dtype)
        state.packing_format_for_cpu = packed  # bitsandbytes' matmul_4bit picks its fused CPU kernel by this
        return state

    def expert_data(self, data: torch.Tensor, expert: int) -> torch.Tensor:
        size = -(-self.shape[1] * self.shape[2] // 2)
        return data.view(-1)[expert * size:(expert + 1) * size]

    def linear(self, x: torch.Tensor, data: torch.Tensor, expert: int) -> torch.Tensor:
        from bitsandbytes import matmul_4bit

        return matmul_4bit(x, self.expert_data(data, expert).view(-1, 1), self.experts[expert])

    def dequantize(self, data: torch.Tensor, expert: int) -> torch.Tensor:
        from bitsandbytes.functional import dequantize_4bit

        codes, state = self.expert_data(data, expert), self.experts[expert]
        if state.packing_format_for_cpu:  # an experts forward that reads weights whole (Llama 4's batched matmul)
            codes, state = self._plain_layout(codes, state)
        return dequantize_4bit(codes, state)

    def _plain_layout(self, codes: torch.Tensor, state):
        """One expert's codes and state back from the fused CPU kernel's layout to bitsandbytes' plain one."""
        from bitsandbytes.functional import QuantState

        rows, cols = self.shape[1:]
        absmax = state.absmax.view(cols // state.blocksize, rows).t().reshape(-1).float()
        plain = QuantState(absmax=absmax, shape=state.shape, code=state.code, blocksize=state.blocksize,
                           quant_type=state.quant_type, dtype=state.dtype)
        return _plain_order(codes.view(rows, cols // 2)).view(-1), plain

    def to_kernel_layout(self, data: torch.Tensor, transposed: bool) -> None:
        """Rearrange `data` in place for bitsandbytes' fused CPU kernel, where this machine has it and the shape
        fits it (rows in blocks of 32, quantization blocks within rows, weights stored [out, in]). The kernel
        reads scales per (block of columns, row) in bf16, as bitsandbytes' own 4-bit layers on the CPU do."""
        from bitsandbytes.functional import QuantState

        rows, cols = self.shape[1:]
        blocksize = self.quant_state.blocksize
        if (transposed or data.device.type != "cpu" or rows % CPU_ROW_BLOCK or cols % blocksize
                or not _fused_cpu_kernel()):
            return
        for expert in range(self.shape[0]):
            part = self.expert_data(data, expert)
            part.copy_(_cpu_kernel_order(part.view(rows, cols // 2)).view(-1))
        absmax = self.quant_state.absmax.view(-1, rows, cols // blocksize).transpose(1, 2).to(torch.bfloat16)
        absmax = absmax.contiguous().view(-1)
        self.quant_state = QuantState(absmax=absmax, shape=self.shape, code=self.quant_state.code,
                                      blocksize=blocksize, quant_type=self.quant_state.quant_type,
                                      dtype=torch.bfloat16)
        self.experts = [self._expert_state(absmax, e, packed=True) for e in range(self.shape[0])]


def _fused_cpu_kernel() -> bool:
    """Whether bitsandbytes has its fused 4-bit kernel for this CPU (AVX512-BF16; bitsandbytes 0.48 and later)."""
    from bitsandbytes import functional

    return bool(getattr(functional, "has_avx512bf16", lambda: False)())


def _cpu_kernel_order(codes: torch.Tensor) -> torch.Tensor:
    """NF4 bytes of one [rows, cols] matrix ([rows, cols / 2], two codes a byte, the first in the high nibble) in
    the order of bitsandbytes' fused CPU kernel: for each block of 32 rows and each pair of columns, the 64 codes
    with rows 0-15 in the low nibbles and rows 16-31 in the high ones (bitsandbytes'
    _convert_weight_packed_for_cpu, with one byte of scratch per code instead of four)."""
    rows, half = codes.shape
    ordered = torch.stack((codes >> 4, codes & 0xF), dim=-1)  # [rows, half, 2]: every code in its own byte
    ordered = ordered.view(rows // CPU_ROW_BLOCK, CPU_ROW_BLOCK, half, 2).transpose(1, 2).reshape(-1, 64)
    return (ordered[:, 32:] << 4 | ordered[:, :32]).view(rows, half)


def _plain_order(codes: torch.Tensor) -> torch.Tensor:
    """The inverse of _cpu_kernel_order."""
    rows, half = codes.shape
    ordered = torch.cat((codes.view(-1, 32) & 0xF, codes.view(-1, 32) >> 4), dim=1)  # [blocks, 64] codes
    ordered = ordered.view(rows // CPU_ROW_BLOCK, half, CPU_ROW_BLOCK, 2).transpose(1, 2).reshape(rows, half, 2)
    return ordered[..., 0] << 4 | ordered[..., 1]


class Int8Rows(ExpertCodec):
    """int8 weights with one absmax scale per output row, dequantized one expert at a time."""

    def __init__(self, role: str, scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype):
        super().__init__(role, shape, dtype)
        self.register_buffer("scale", scale)

    def dequantize(self, data: torch.Tensor, expert: int) -> torch.Tensor:
        return (data[expert].float() * self.scale[expert]).to(self.dtype)


def slice_size(numel: int) -> int:
    """Elements quantized at once: the power of two nearest below numel / 16, within [SLICE_MIN, SLICE_MAX]."""
    return max(SLICE_MIN, min(SLICE_MAX, 1 << max(0, (numel // 16).bit_length() - 1)))


def quantize_nf4(weight: torch.Tensor, role: str) -> tuple[torch.Tensor, Nf4]:
    """NF4 data and its codec, expert by expert (no quantization block spans two experts), slice by slice."""
    from bitsandbytes.functional import QuantState, quantize_4bit

    size = slice_size(weight.numel())
    slices = [quantize_4bit(expert[i:i + size], quant_type="nf4")
              for expert in weight.reshape(weight.shape[0], -1) for i in range(0, expert.numel(), size)]
    first = slices[0][1]
    state = QuantState(absmax=torch.cat([s.absmax for _, s in slices]), shape=weight.shape, code=first.code,
                       blocksize=first.blocksize, quant_type=first.quant_type, dtype=weight.dtype)
    return torch.cat([data for data, _ in slices]), Nf4(role, state)


def quantize_int8(weight: torch.Tensor, role: str) -> tuple[torch.Tensor, Int8Rows]:
    """Row-wise absmax int8, one expert at a time (the scratch is one expert in float32)."""
    data = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    scale = torch.empty(*weight.shape[:-1], 1, dtype=torch.float32, device=weight.device)
    for e in range(weight.shape[0]):
        rows = weight[e].float()
        scale[e] = rows.abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / 127
        data[e] = (rows / scale[e]).round_().clamp_(-127, 127).to(torch.int8)
    return data, Int8Rows(role, scale, weight.shape, weight.dtype)


PRECISIONS = {
    "4bit": Precision("4bit", torch.bfloat16, {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                                               "bnb_4bit_compute_dtype": torch.bfloat16}, quantize_nf4),
    "8bit": Precision("8bit", torch.bfloat16, {"load_in_8bit": True}, quantize_int8),
    "bf16": Precision("bf16", torch.bfloat16),
    "fp32": Precision("fp32", torch.float32),
}
PRECISION_ALIASES = {"nf4": "4bit", "int8": "8bit", "bfloat16": "bf16", "float32": "fp32"}


def precision_named(name: str) -> Precision:
    key = PRECISION_ALIASES.get(name, name)
    if key not in PRECISIONS:
        raise StudioError(f"Unknown precision {name!r}; choose one of {', '.join(PRECISIONS)}.")
    return PRECISIONS[key]


def device_map(device: str, quantized: bool) -> tuple[str | dict, dict]:
    """accelerate's device map for `device`, and the bitsandbytes settings that map needs."""
    check_device(device)
    if device == "auto" and torch.cuda.is_available():
        # Every GPU first, then the CPU; bitsandbytes must be told that some layers may stay on the CPU.
        return "auto", ({"llm_int8_enable_fp32_cpu_offload": True} if quantized else {})
    return ("cpu" if device == "auto" else device), {}


def load_model(source: ModelSource, config, precision: Precision, device: str, trust_remote_code: bool):
    """The model of `source` at `precision` on `device`, streamed from its checkpoint; eval mode."""
    import transformers
    from transformers import BitsAndBytesConfig, GenerationConfig

    if mxfp4.is_mxfp4(config):  # its experts are dequantised as they are read (_LazyStateDict)
        config = mxfp4.without_mxfp4(config)
    loader = model_class(config, trust_remote_code)
    with torch.device("meta"):  # the architecture without weights: its class and module names
        skeleton = loader.from_config(config, trust_remote_code=trust_remote_code) if hasattr(loader, "from_config") \
            else loader._from_config(config)
    where, offload = device_map(device, precision.bnb is not None)
    kwargs = {"dtype": precision.dtype, "device_map": where}
    if precision.bnb:
        kwargs["quantization_config"] = BitsAndBytesConfig(**precision.bnb, **offload,
                                                           llm_int8_skip_modules=unquantized_modules(skeleton))
    if int(transformers.__version__.split(".")[0]) < 5:
        # 4.x keeps experts as nn.Linear modules, which bitsandbytes quantizes itself.
        return loader.from_pretrained(source.folder, trust_remote_code=trust_remote_code, **kwargs).eval()
    if precision.experts:  # the forward that runs routed experts one by one, reading each expert's matrix
        kwargs["experts_implementation"] = "eager"
    expert_counts = {expert_count(config), router_width(config)}
    with freed_memory_returned_at_once(), quantized_experts(precision.experts, expert_counts):
        model = type(skeleton).from_pretrained(None, config=config, state_dict=_LazyStateDict(source), **kwargs)
    if source.file("generation_config.json"):  # from_pretrained reads it only when given the folder
        model.generation_config = GenerationConfig.from_pretrained(source.folder)
    return model.eval()


def unquantized_modules(skeleton: nn.Module) -> list[str]:
    """Linear layers bitsandbytes must leave alone: the output embedding (as transformers does by default), and
    layers whose outputs do not fill whole CPU-kernel blocks of 32 rows, such as Qwen2-MoE's one-output
    shared-expert gate, or that are empty, such as the zero-width shared expert of a Qwen2-MoE merged without
    one, or that read a number of values bitsandbytes' CPU kernel cannot block (not a multiple of 64: the small
    projections of state-space and per-layer-input layers), since bitsandbytes' CPU path fails on them; they are
    tiny anyway."""
    output = skeleton.get_output_embeddings()
    return [name for name, module in skeleton.named_modules()
            if module is output or (isinstance(module, nn.Linear)
                                    and (module.out_features % CPU_ROW_BLOCK or module.in_features % CPU_IN_BLOCK
                                         or not module.weight.numel()))]


@contextmanager
def freed_memory_returned_at_once() -> Iterator[None]:
    """While loading, serve every buffer of 64 KiB or more from a mapping of its own, so that freeing it gives
    the memory back to the system at once; afterwards, keep buffers under 32 MiB on the heap.

    glibc's default keeps buffers of up to 32 MiB on the heap once one that large has been freed, and the
    tensors freed while a checkpoint streams then stay resident: the loading peak would grow with the model
    instead of with one layer. During generation the heap is what we want: where 4-bit experts are dequantized
    (no fused kernel), each routed expert is a fresh buffer at every step, and fresh mappings for them cost page
    faults every time (4x slower, measured on CPU). glibc cannot be put back into its adaptive mode, so the
    32 MiB ceiling of that mode is set, with a trim threshold that keeps freed heap memory for reuse. Nothing
    happens without glibc.
    """
    mallopt = _glibc_mallopt()
    if mallopt:
        mallopt(M_MMAP_THRESHOLD, 64 << 10)
    try:
        yield
    finally:
        if mallopt:
            mallopt(M_MMAP_THRESHOLD, 32 << 20)
            mallopt(M_TRIM_THRESHOLD, 64 << 20)


def _glibc_mallopt():
    libc = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc), "mallopt", None) if libc else None


class _LazyTensor:
    """A checkpoint tensor that is read from disk (into memory of its own) only when transformers slices it."""

    def __init__(self, source: ModelSource, name: str):
        self.source, self.name = source, name

    def __getitem__(self, index):
        return self.source.read(self.name)[index]


class _LazyStateDict(dict):
    """Every tensor of a checkpoint, unread (MXFP4 blocks and scales as the tensor they pack). transformers
    deep-copies its arguments; this one is shared."""

    def __init__(self, source: ModelSource):
        super().__init__({name: _LazyTensor(source, name) for name in source.tensors})
        for name, (blocks, scales) in mxfp4.packed_pairs(source.tensors).items():
            del self[blocks], self[scales]
            self[name] = mxfp4.PackedTensor(source.read, blocks, scales)

    def __deepcopy__(self, memo) -> "_LazyStateDict":
        return self


@contextmanager
def quantized_experts(quantize: Callable | None, experts: int | set[int]) -> Iterator[None]:
    """While transformers loads a model in this thread, quantize each fused expert tensor as it is set.

    An expert tensor is a floating 3-D parameter whose first dimension is the expert count (or one of the counts:
    LongCat's fused gate and up projections include its zero experts). torch calls the
    registration hook with each new parameter; it returns the quantized data in its place, and the
    parametrization that dequantizes it is attached once loading is done (transformers checks parameters by
    name until then).
    """
    if quantize is None:
        yield
        return
    counts = {experts} if isinstance(experts, int) else experts
    thread = threading.get_ident()
    pending: list[tuple[nn.Module, str, ExpertCodec]] = []

    def hook(module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        if (threading.get_ident() != thread or param is None or param.is_meta or param.dim() != 3
                or param.shape[0] not in counts or not param.is_floating_point()):
            return None
        data, codec = quantize(param.data, name)
        pending.append((module, name, codec))
        quantized = nn.Parameter(data, requires_grad=False)
        quantized._is_hf_initialized = True  # transformers would otherwise re-initialize it
        return quantized

    handle = nn.modules.module.register_module_parameter_registration_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    for module, name, codec in pending:
        parametrize.register_parametrization(module, name, codec, unsafe=True)
        codec.to_kernel_layout(module.parametrizations[name].original, getattr(module, "is_transposed", False))


def footprint(model: nn.Module) -> int:
    """Bytes of every parameter, buffer and quantization state (absmax, codes, scales), shared storage once."""
    seen: set[int] = set()
    total = 0
    for tensor in _all_tensors(model):
        key = tensor.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += tensor.untyped_storage().nbytes()
    return total


def layer_expert_bytes(source: ModelSource) -> int:
    """Bytes at bf16 of the largest layer's expert tensors in a checkpoint: the "one layer" of the loading bound."""
    per_layer: dict[str, int] = {}
    for name, info in source.tensors.items():
        match = re.search(r"layers\.(\d+)\..*experts\.", name)
        if match:
            per_layer[match[1]] = per_layer.get(match[1], 0) + info.nbytes // info.dtype.itemsize * 2
    return max(per_layer.values(), default=0)


def _all_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()
    yield from model.buffers()
    for module in model.modules():
        yield from _quant_state_tensors(getattr(module, "quant_state", None))
        for param in module.parameters(recurse=False):
            yield from _quant_state_tensors(getattr(param, "quant_state", None))
            if getattr(param, "SCB", None) is not None:  # LLM.int8 row scales
                yield param.SCB


def _quant_state_tensors(state) -> Iterator[torch.Tensor]:
    while state is not None:
        yield from (t for t in (state.absmax, state.code) if t is not None)
        state = state.state2

