"""Tiny random checkpoints of every Mixture-of-Experts family transformers ships, in their published layouts.

The families are found in the installed transformers (every causal-LM config class that speaks of experts, and
the multimodal wrappers in which some MoEs are published); each is built from its own config class with a tiny
shape (2 layers, hidden 64, 4 experts), saved with `save_pretrained` and the synthetic tokenizer. What a family
needs beyond the common tiny shape is data below, not code.
"""

from __future__ import annotations

import inspect
import json
import re
from functools import lru_cache
from pathlib import Path

import torch

from studio.build.synthetic import make_tokenizer, save_tokenizer

EXPERTS = 4
# bitsandbytes' CPU 4-bit kernel needs every quantized linear layer to read a multiple of 64 values.
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 64, "moe_intermediate_size": 64,
        "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 16, "vocab_size": 384,
        "max_position_embeddings": 128, "num_experts_per_tok": 2, "tie_word_embeddings": False,
        "shared_expert_intermediate_size": 64, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2,
        # multi-head latent attention, sparse-attention indexers, linear attention, per-layer inputs
        "kv_lora_rank": 64, "q_lora_rank": 64, "qk_rope_head_dim": 16, "qk_nope_head_dim": 16, "v_head_dim": 16,
        "index_head_dim": 16, "index_n_heads": 2, "index_topk": 8, "linear_key_head_dim": 16,
        "linear_value_head_dim": 16, "linear_head_dim": 16, "vocab_size_per_layer_input": 384,
        "hidden_size_per_layer_input": 8,
        # one dense layer, then one MoE layer, where a family has both; one expert group
        "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "num_expert_group": 1,
        "moe_k": 2, "num_experts_per_token": 2, "moe_topk": 2, "top_k_experts": 2}
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# What a family needs beyond TINY (its own names for the shape, or values its validators insist on).
EXTRA: dict[str, dict] = {
    "dbrx": {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 128,
             "attn_config": {"kv_n_heads": 4, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 64, "moe_num_experts": EXPERTS, "moe_top_k": 2}},
    "dots1": {"n_routed_experts": EXPERTS, "n_shared_experts": 1},
    "gemma4_text": {"enable_moe_block": True, "num_experts": EXPERTS, "top_k_experts": 2,
                    "layer_types": ["sliding_attention", "full_attention"]},
    "bailing_hybrid": {"mlp_layer_types": ["dense", "sparse"], "layer_types": ["linear_attention", "full_attention"],
                       "num_experts_per_token": 2},
    "beam": {"mlp_layer_types": ["dense", "sparse"], "layer_types": ["sliding_attention", "full_attention"]},
    "doge": {"is_moe": True},
    "flint": {"mlp_only_layers": [0], "layer_types": ["full_attention", "sliding_attention"]},
    "granitemoehybrid": {"mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_chunk_size": 16,
                         "layer_types": ["mamba", "attention"]},
    "mimo_v2_flash": {"head_dim": 12, "num_key_value_heads": 2, "layer_types": ["full_attention", "sliding_attention"],
                      "mlp_layer_types": ["dense", "sparse"]},
    "mistral4": {"head_dim": 32, "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 1.0,
                                     "original_max_position_embeddings": 128, "llama_4_scaling_beta": 0.1,
                                     "max_position_embeddings": 128}},
    # hybrids: one attention layer, so that generation has a cache of attention to count tokens by
    "jamba": {"attn_layer_offset": 1, "attn_layer_period": 2},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen3_5_moe_text": {"layer_types": ["linear_attention", "full_attention"]},
    "kimi_linear": {"layer_types": ["linear_attention", "full_attention"]},
    "longcat_flash": {"num_layers": 2, "ffn_hidden_size": 64, "expert_ffn_hidden_size": 64, "zero_expert_num": 2},
    "lfm2_moe": {"num_dense_layers": 1, "layer_types": ["conv", "full_attention"]},
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 64},
}
# Families published as a multimodal `...ForConditionalGeneration` whose `text_config` holds the MoE: the wrapper's
# model type, and a tiny vision tower of its own names.
WRAPPED = {
    "llama4_text": ("llama4", {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 4,
                               "intermediate_size": 32, "vision_output_dim": 32, "image_size": 28, "patch_size": 14,
                               "projector_input_dim": 64, "projector_output_dim": 64}),
    "gemma4_text": ("gemma4", {"hidden_size": 32, "intermediate_size": 32, "num_hidden_layers": 1,
                               "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8}),
    "qwen3_5_moe_text": ("qwen3_5_moe", {"depth": 1, "hidden_size": 32, "intermediate_size": 32, "num_heads": 4,
                                         "out_hidden_size": 64}),
}
# Causal LMs that transformers' causal-LM auto mapping leaves out, and their class.
EXTRA_CAUSAL_LMS = {"mistral4": "Mistral4ForCausalLM"}


@lru_cache(maxsize=1)
def family_names() -> tuple[str, ...]:
    """Every MoE causal-LM model type of the installed transformers (text model types of the wrapped ones)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    names = []
    for model_type in (*MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, *EXTRA_CAUSAL_LMS):
        config_class = getattr(transformers, CONFIG_MAPPING_NAMES.get(model_type, ""), None)
        if config_class is not None and re.search("expert", inspect.getsource(config_class), re.I):
            names.append(model_type)
    return tuple(dict.fromkeys(names))


def tiny_config(model_type: str, **changes):
    """The family's config class with the tiny shape: only the keys it knows, 4 experts wherever it counts them
    (and `changes`)."""
    from transformers import AutoConfig

    config_class = type(AutoConfig.for_model(model_type))
    default = config_class()
    values = {key: value for key, value in TINY.items() if key in default.to_dict()}
    values |= {key: EXPERTS for key in EXPERT_COUNT_KEYS if isinstance(default.to_dict().get(key), int)}
    return config_class(**values | EXTRA.get(model_type, {}) | changes)


def published_config(model_type: str, **changes):
    """The config as the family is published: the wrapper around it for WRAPPED families."""
    if model_type not in WRAPPED:
        return tiny_config(model_type, **changes)
    from transformers import AutoConfig

    wrapper, vision = WRAPPED[model_type]
    return type(AutoConfig.for_model(wrapper))(text_config=tiny_config(model_type, **changes).to_dict(),
                                               vision_config=vision)


def build_family(model_type: str, folder: Path, seed: int = 0, **changes) -> Path:
    """A tiny random checkpoint of the family in `folder`, saved as transformers saves it, with a tokenizer;
    `changes` are config values of the family's text model."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = published_config(model_type, **changes)
    torch.manual_seed(seed)
    import transformers

    auto = AutoModelForImageTextToText if model_type in WRAPPED else AutoModelForCausalLM
    model_class = getattr(transformers, EXTRA_CAUSAL_LMS[model_type]) if model_type in EXTRA_CAUSAL_LMS else auto
    model = model_class.from_config(config) if model_class is auto else model_class(config)
    _spread_routing(model)
    model.save_pretrained(folder)
    if model_type in PUBLISHED_AS:
        PUBLISHED_AS[model_type](folder)
    save_tokenizer(make_tokenizer(), folder)
    return folder


def _spread_routing(model: torch.nn.Module) -> None:
    """A fresh model's routing biases are zero: give them values, so that a trace that left them out of the choice
    of experts would name other experts than the model runs."""
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            if re.search(r"(e_score_correction_bias|expert_bias)$", name):
                tensor.copy_(torch.linspace(-0.5, 0.5, tensor.numel()).reshape(tensor.shape))


def saved_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def mxfp4_pack(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A transformers (experts, columns, rows) tensor as published MXFP4 blocks and scales: each block of 32 values
    along the columns at the nearest E2M1 value of the block's power-of-two range."""
    from studio.mxfp4 import FP4_VALUES, SCALE_BIAS

    published = weight.float().transpose(1, 2)
    groups = published.reshape(*published.shape[:-1], -1, 32)
    exponents = torch.ceil(torch.log2(groups.abs().amax(dim=-1).clamp_min(2.0 ** -126) / 6)).clamp(-SCALE_BIAS, 127)
    scaled = groups / torch.exp2(exponents)[..., None]
    codes = (scaled[..., None] - torch.tensor(FP4_VALUES)).abs().argmin(dim=-1)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8), (exponents + SCALE_BIAS).to(torch.uint8)


def publish_in_mxfp4(folder: Path) -> None:
    """Rewrite a saved gpt-oss as OpenAI publishes it: fused experts in MXFP4, the rest as it was."""
    from safetensors.torch import load_file, save_file

    weights = load_file(folder / "model.safetensors")
    for name in [n for n in weights if re.search(r"experts\.(gate_up_proj|down_proj)$", n)]:
        weights[f"{name}_blocks"], weights[f"{name}_scales"] = mxfp4_pack(weights.pop(name))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    config = saved_config(folder)
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(config, indent=2))


# Families published in a layout of their own, and what rewrites a saved checkpoint into it.
PUBLISHED_AS = {"gpt_oss": publish_in_mxfp4}
