"""Mixtral output, written in the classic tensor names every loader reads.

`block_sparse_moe.experts.J.w1|w2|w3` is what transformers 4.x, 5.x (which converts it on load), vLLM
and llama.cpp's converter all understand; the fused v5 layout is read by transformers 5 alone.
"""

from __future__ import annotations

from studio.build.outputs import MergeInputs, OutputArch, base_fields
from studio.config import MoEConfig

CLASSIC_NAMES = {"gate": "w1", "down": "w2", "up": "w3"}


def bias_misfit(base_config: dict) -> str | None:
    """Why a Mixtral-shaped output (no biases) cannot hold this Llama-family base, or None."""
    if base_config.get("attention_bias") or base_config.get("mlp_bias"):
        return "has no attention or MLP biases, and the base uses them"
    return None


class Mixtral(OutputArch):
    name = "Mixtral"
    input_model_types = ("llama", "mistral")

    def why_not(self, inputs: MergeInputs) -> str | None:
        return bias_misfit(inputs.base_config) or super().why_not(inputs)

    def moe_config(self, base_config: dict, config: MoEConfig, dtype: str | None) -> dict:
        # Llama fields Mixtral lacks would be kept by transformers but mean nothing; drop the misleading ones.
        out = base_fields(base_config, dtype, ("mlp_bias", "pretraining_tp"))
        out.update({
            "architectures": ["MixtralForCausalLM"],
            "model_type": "mixtral",
            "num_local_experts": len(config.experts),
            "num_experts_per_tok": config.experts_per_token,
            "sliding_window": base_config.get("sliding_window"),
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
            "router_jitter_noise": 0.0,
        })
        return out

    def router(self, layer: int) -> str:
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"

    def expert(self, layer: int, expert: int) -> dict[str, str]:
        prefix = f"model.layers.{layer}.block_sparse_moe.experts.{expert}"
        return {role: f"{prefix}.{short}.weight" for role, short in CLASSIC_NAMES.items()}
