"""Qwen3-MoE output (transformers' own Qwen3MoeForCausalLM) for qwen3 inputs; q_norm and k_norm come from the
base like every other attention tensor. No shared expert: Qwen3-MoE has none."""

from __future__ import annotations

from studio.build.outputs import ExpertList, base_fields
from studio.build.outputs.qwen2_moe import qwen_moe_fields
from studio.config import MoEConfig


class Qwen3MoE(ExpertList):
    name = "Qwen3 MoE"
    input_model_types = ("qwen3",)

    def moe_config(self, base_config: dict, config: MoEConfig, dtype: str | None) -> dict:
        out = base_fields(base_config, dtype)
        out.update(qwen_moe_fields(base_config, config, renormalize=True))  # llama.cpp's qwen3moe graph does too
        out.update(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe")
        return out
