"""Qwen2-MoE output (transformers' own Qwen2MoeForCausalLM) for qwen2, llama and mistral inputs.

Written so that transformers, vLLM and llama.cpp (its converter and its qwen2moe graph) run it alike:
- the top-k weights are the router's softmax probabilities, not renormalised (`norm_topk_prob: false`): llama.cpp's
  qwen2moe graph never renormalises them, whatever the config says;
- the output head is written (`lm_head.weight`, a copy of a tied base's embedding): llama.cpp's qwen2moe graph
  has no tied head;
- its MoE block always has a shared expert behind a sigmoid gate; a prompted shared expert (or any, under the
  random gate modes) gets its gate row as `shared_expert_gate`;
- an unprompted one gets an idle gate, so small that sigmoid gives 1/2 (exactly, in bf16 and float32), and its
  down_proj is doubled (an exact scaling in any float format): the shared expert then adds its whole output to
  every token, ungated. The gate is not zero because llama.cpp computes sigmoid(x) as silu(x)/x, NaN at 0;
- without a shared expert, the shared expert has width 64 and zero weights, so its output is exactly zero (llama.cpp
  reads a width of 0 as "as wide as the routed experts", and 4-bit kernels want even, block-sized widths);
- a base without q/k/v biases (llama, mistral) gets zero biases, which change nothing.
"""

from __future__ import annotations

import torch

from studio.build.outputs import ExpertList, MergeInputs, base_fields, swiglu_names
from studio.config import MoEConfig
from studio.families import head_dim, kv_heads

# Idle gate values: their product with a token's hidden state stays far below 1e-7, where float32's sigmoid is
# exactly 1/2, and far above the subnormal range. float16 cannot hold 2**-48; 2**-24 is its smallest value.
IDLE_GATE = 2.0 ** -48
IDLE_GATE_FLOAT16 = 2.0 ** -24
# The width of the all-zero shared expert that stands in for none: one quantization block of bitsandbytes.
IDLE_SHARED_WIDTH = 64


def qwen_moe_fields(base_config: dict, config: MoEConfig, renormalize: bool) -> dict:
    """What Qwen2-MoE and Qwen3-MoE configs add to the base's: every layer sparse, each expert as wide as the
    base's MLP, top-k renormalised (`renormalize`) as in Mixtral or not."""
    return {
        "head_dim": head_dim(base_config),
        "num_experts": len(config.experts),
        "num_experts_per_tok": config.experts_per_token,
        "moe_intermediate_size": base_config["intermediate_size"],
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": renormalize,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
    }


class Qwen2MoE(ExpertList):
    name = "Qwen MoE"
    input_model_types = ("qwen2", "llama", "mistral")
    max_shared_experts = 1
    ungated_shared_scale = 2.0  # makes up for sigmoid(idle gate) = 1/2
    explicit_lm_head = "lm_head.weight"

    def why_not(self, inputs: MergeInputs) -> str | None:
        if inputs.base_config.get("mlp_bias"):
            return "has no MLP biases, and the base uses them"
        if inputs.base_config.get("model_type") != "qwen2" and inputs.base_config.get("attention_bias"):
            return "has no output-projection bias, and the base's attention uses one"
        return super().why_not(inputs)

    def moe_config(self, base_config: dict, config: MoEConfig, dtype: str | None) -> dict:
        out = base_fields(base_config, dtype, ("mlp_bias", "pretraining_tp", "attention_bias"))
        layers = base_config["num_hidden_layers"]
        window = base_config.get("sliding_window")
        if base_config.get("model_type") == "mistral" and window:  # Mistral slides its window in every layer
            out.update(use_sliding_window=True, max_window_layers=layers, layer_types=["sliding_attention"] * layers)
        elif base_config.get("model_type") != "qwen2":
            out.update(use_sliding_window=False, sliding_window=None)
        out.update(qwen_moe_fields(base_config, config, renormalize=False))
        out.update(architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", qkv_bias=True,
                   tie_word_embeddings=False,
                   shared_expert_intermediate_size=base_config["intermediate_size"] if config.shared_experts
                   else IDLE_SHARED_WIDTH)
        return out

    def shared_expert(self, layer: int) -> dict[str, str]:
        return swiglu_names(f"model.layers.{layer}.mlp.shared_expert")

    def shared_gate(self, layer: int) -> str | None:
        return f"model.layers.{layer}.mlp.shared_expert_gate.weight"

    def idle_gate_fill(self, dtype: torch.dtype) -> float:
        return IDLE_GATE_FLOAT16 if dtype == torch.float16 else IDLE_GATE

    def zero_tensors(self, base_config: dict, config: MoEConfig, base_names: set[str]) -> dict[str, tuple[int, ...]]:
        hidden, dim = base_config["hidden_size"], head_dim(base_config)
        kv = kv_heads(base_config)
        widths = {"q": base_config["num_attention_heads"] * dim, "k": kv * dim, "v": kv * dim}
        zeros = {}
        for layer in range(base_config["num_hidden_layers"]):
            attention = f"model.layers.{layer}.self_attn"
            zeros.update({f"{attention}.{p}_proj.bias": (width,) for p, width in widths.items()
                          if f"{attention}.{p}_proj.bias" not in base_names})
            if not config.shared_experts:
                width = IDLE_SHARED_WIDTH
                shapes = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
                zeros.update({name: shapes[role] for role, name in self.shared_expert(layer).items()})
        return zeros
