"""Phi-2 -> Phixtral-style MoE: the studio's own model classes (studio/build/outputs/modeling/*_phixtral.py), written
next to the weights and named in config.json's `auto_map`, so the output loads offline with
`trust_remote_code=True`. Every Phi-2 tensor keeps its name; each layer's MLP becomes `mlp.experts.J.fc1|fc2`
(weights and biases) plus a router `mlp.gate`."""

from __future__ import annotations

from studio.build.outputs import OutputArch, base_fields
from studio.config import MoEConfig

CONFIG_CLASS = "configuration_phixtral.PhixtralConfig"
MODEL_CLASS = "modeling_phixtral.PhixtralForCausalLM"


class PhiMoE(OutputArch):
    name = "Phi MoE"
    input_model_types = ("phi",)
    code_files = ("configuration_phixtral.py", "modeling_phixtral.py", "sparse_moe.py")

    def moe_config(self, base_config: dict, config: MoEConfig, dtype: str | None) -> dict:
        out = base_fields(base_config, dtype)
        out.update({
            "architectures": ["PhixtralForCausalLM"],
            "model_type": "phixtral",
            "auto_map": {"AutoConfig": CONFIG_CLASS, "AutoModelForCausalLM": MODEL_CLASS},
            "num_local_experts": len(config.experts),
            "num_experts_per_tok": config.experts_per_token,
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
        })
        return out

    def router(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.weight"

    def expert(self, layer: int, expert: int) -> dict[str, str]:
        prefix = f"model.layers.{layer}.mlp.experts.{expert}"
        return {"fc1": f"{prefix}.fc1.weight", "fc1_bias": f"{prefix}.fc1.bias",
                "fc2": f"{prefix}.fc2.weight", "fc2_bias": f"{prefix}.fc2.bias"}
