"""Checkpoints whose experts are stored in MXFP4 (gpt-oss as OpenAI publishes it), read as full-precision tensors.

Each fused expert tensor `X` is stored as `X_blocks` (uint8, two 4-bit E2M1 values per byte, 16 bytes per block of
32 values) and `X_scales` (uint8, the power of two of each block, biased by 127), in the layout (experts, rows,
columns) that transformers transposes into its own (experts, columns, rows). Every such value times its power of
two is exact in bf16, so dequantising here loses nothing, and the studio then loads the model as any other: at bf16
or fp32, or quantized again to its 4-bit NF4 experts (bitsandbytes cannot take MXFP4 weights as they are). The
experts are always dequantised here: MXFP4 kernels need a recent GPU and triton.
"""

from __future__ import annotations

import copy

import torch

QUANT_METHOD = "mxfp4"
BLOCKS, SCALES = "_blocks", "_scales"
SCALE_BIAS = 127
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def is_mxfp4(config) -> bool:
    """Whether a transformers config (or config.json's dict) declares MXFP4 weights."""
    quantization = config.get("quantization_config") if isinstance(config, dict) \
        else getattr(config, "quantization_config", None)
    method = quantization.get("quant_method") if isinstance(quantization, dict) \
        else getattr(quantization, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == QUANT_METHOD


def without_mxfp4(config):
    """A copy of the config that loads the dequantised tensors as plain weights."""
    plain = copy.deepcopy(config)
    if hasattr(plain, "quantization_config"):
        del plain.quantization_config
    return plain


def packed_pairs(names) -> dict[str, tuple[str, str]]:
    """Tensor name -> (its blocks, its scales), for every packed tensor among `names`."""
    names = set(names)
    return {name[:-len(BLOCKS)]: (name, name[:-len(BLOCKS)] + SCALES) for name in names
            if name.endswith(BLOCKS) and name[:-len(BLOCKS)] + SCALES in names}


class PackedTensor:
    """A packed checkpoint tensor, read and dequantised only when transformers slices it. transformers slices each
    checkpoint tensor once, so nothing is cached: a cache would keep a dequantised copy for the whole load."""

    def __init__(self, read, blocks: str, scales: str):
        self.read, self.blocks, self.scales = read, blocks, scales

    def __getitem__(self, index):
        return dequantize(self.read(self.blocks), self.read(self.scales))[index]


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """(experts, rows, groups, 16) blocks and (experts, rows, groups) scales -> (experts, groups * 32, rows)."""
    table = torch.tensor(FP4_VALUES, dtype=dtype)
    values = torch.stack([table[(blocks & 0x0F).long()], table[(blocks >> 4).long()]], dim=-1)
    values = values.reshape(*blocks.shape[:-1], 32)
    exponents = scales.to(torch.int32) - SCALE_BIAS
    values = torch.ldexp(values, exponents[..., None].to(dtype)).to(dtype)
    return values.reshape(*blocks.shape[:-2], -1).transpose(1, 2).contiguous()
