"""DeepSeek-MoE output for llama and mistral inputs: routed experts plus one ungated shared expert, in
deepseek-moe-16b's config keys and tensor names. transformers ships no class for it, so the studio writes its
own (studio/build/outputs/modeling/*_deepseek.py) next to the weights and names it in `auto_map`: the output loads
offline with `trust_remote_code=True`, where mergekit's points at code on the Hub.

Written so that transformers, vLLM and llama.cpp (its converter and its deepseek graph) run it alike: the top-k
weights are the router's softmax probabilities, not renormalised (`norm_topk_prob: false`, as deepseek-moe-16b;
llama.cpp's deepseek graph never renormalises), and every layer has one shared expert (llama.cpp's graph always
runs one, and its converter cannot read `n_shared_experts: null`): without a shared expert in the config, one of
zeros, whose output is exactly zero."""

from __future__ import annotations

from studio.build.outputs import ExpertList, MergeInputs, base_fields, swiglu_names
from studio.build.outputs.mixtral import bias_misfit
from studio.config import MoEConfig

CONFIG_CLASS = "configuration_deepseek.DeepseekConfig"
MODEL_CLASS = "modeling_deepseek.DeepseekForCausalLM"


class DeepseekMoE(ExpertList):
    name = "DeepSeek MoE"
    input_model_types = ("llama", "mistral")
    max_shared_experts = 1
    code_files = ("configuration_deepseek.py", "modeling_deepseek.py", "sparse_moe.py")

    def why_not(self, inputs: MergeInputs) -> str | None:
        if any(e.positive_prompts for e in inputs.config.shared_experts or []):
            return "has an ungated shared expert, and the config gives it prompts"
        return bias_misfit(inputs.base_config) or super().why_not(inputs)

    def moe_config(self, base_config: dict, config: MoEConfig, dtype: str | None) -> dict:
        out = base_fields(base_config, dtype, ("mlp_bias", "pretraining_tp", "attention_bias"))
        out.update({
            "architectures": ["DeepseekForCausalLM"],
            "model_type": "deepseek",
            "auto_map": {"AutoConfig": CONFIG_CLASS, "AutoModelForCausalLM": MODEL_CLASS},
            "n_routed_experts": len(config.experts),
            "n_shared_experts": 1,
            "num_experts_per_tok": config.experts_per_token,
            "moe_intermediate_size": base_config["intermediate_size"],
            "first_k_dense_replace": 0,
            "moe_layer_freq": 1,
            "scoring_func": "softmax",
            "norm_topk_prob": False,
            "sliding_window": base_config.get("sliding_window"),
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
        })
        return out

    def shared_expert(self, layer: int) -> dict[str, str]:
        return swiglu_names(f"model.layers.{layer}.mlp.shared_experts")

    def zero_tensors(self, base_config: dict, config: MoEConfig, base_names: set[str]) -> dict[str, tuple[int, ...]]:
        if config.shared_experts:
            return {}
        hidden, width = base_config["hidden_size"], base_config["intermediate_size"]
        shapes = {"gate": (width, hidden), "up": (width, hidden), "down": (hidden, width)}
        return {name: shapes[role] for layer in range(base_config["num_hidden_layers"])
                for role, name in self.shared_expert(layer).items()}
