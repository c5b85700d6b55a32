"""Where the published MoE families of transformers keep their routing, as data.

Most families are read by the defaults: the router is the module called `gate` or `router` in each decoder
layer, its first output is the logits, the probabilities are their softmax, and the experts the model runs are
the `(indices, weights)` its `experts` module is called with (so routing biases and grouped choices are
included as the model applies them). What differs is listed per model type: where the expert count is, how the
router scores experts (sigmoid, or probabilities already), which output holds the logits, routers that score keys
rather than experts (Doge), and router outputs that are not experts (LongCat's zero experts, ZAYA's skip
expert). Multimodal wrappers route their text model.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import isqrt

import torch

from studio.errors import StudioError

# Where a config counts its routed experts; a dotted key is a nested config (DBRX's ffn_config).
EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts",
                     "ffn_config.moe_num_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "top_k_experts", "num_experts_per_token", "moe_k",
              "ffn_config.moe_top_k")


class ProductKeys:
    """Doge's router scores 2 x sqrt(experts) keys per token: expert i * sqrt(experts) + j scores key i of the first
    half plus key j of the second, and the model picks its experts among all of them by that sum. The halves are
    split as the model splits them: a view of the router's whole output as (2, tokens, keys), which pairs the
    first half of the tokens with the second when several tokens go through at once, as in the model."""

    @staticmethod
    def width(experts: int) -> int:
        return 2 * isqrt(experts)

    @staticmethod
    def expert_logits(output: torch.Tensor) -> torch.Tensor:
        halves = output.reshape(2, -1, output.shape[-1] // 2)
        return (halves[0][:, :, None] + halves[1][:, None, :]).flatten(1)


class OneLogitPerExpert:
    """The usual router: one logit per expert."""

    @staticmethod
    def width(experts: int) -> int:
        return experts

    @staticmethod
    def expert_logits(output: torch.Tensor) -> torch.Tensor:
        return output


@dataclass(frozen=True)
class RouterLayout:
    """How one family's router is read.

    scoring: what turns the logits into the model's probabilities (softmax, sigmoid, or none: "probabilities"
    when the router already returns them). logits_output: which of the router's outputs holds them.
    renormalize: whether the chosen weights are rescaled to sum to 1, for families whose experts module is not
    called with the choice (Llama 4 weighs by the sigmoid itself). extra_outputs and extra_label: router outputs
    after the routed experts and their names. extra_rows: router weight rows that are not outputs. names: what
    the MoE block calls its router. logits: how the router's output gives one logit per expert.
    """

    scoring: str = "softmax"
    logits_output: int = 0
    renormalize: bool | None = None
    extra_outputs: tuple[str | int, ...] = ()  # config keys holding counts of extra router columns, or counts
    extra_label: str = "extra {i}"
    extra_rows: tuple[str | int, ...] = ()  # router weight rows beyond the outputs (Inkling's shared-expert gammas)
    names: tuple[str, ...] = ("gate", "router")
    logits: type = OneLogitPerExpert


# Families whose router scores each expert by the sigmoid of its logit (DeepSeek-V3 and its descendants).
SIGMOID_FAMILIES = ("axk1", "axk2", "bailing_hybrid", "beam", "deepseek_v3", "deepseek_v32", "dots1",
                    "dots3_note_text", "exaone_moe", "flint", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "hy_v3",
                    "hy_v4", "inkling2_text", "kimi_linear", "kolibri1", "laguna", "lfm2_moe", "mimo_v2_flash",
                    "minimax_m2", "minimax_m3_vl_text", "nemotron_h", "solar_open")
LAYOUTS: dict[str, RouterLayout] = {
    **{model_type: RouterLayout(scoring="sigmoid") for model_type in SIGMOID_FAMILIES},
    "llama4_text": RouterLayout(scoring="sigmoid", logits_output=1, renormalize=False),
    "gemma4_text": RouterLayout(scoring="probabilities"),
    "jetmoe": RouterLayout(logits_output=-1, renormalize=True),
    "doge": RouterLayout(names=("router_gate",), renormalize=True, logits=ProductKeys),
    "longcat_flash": RouterLayout(extra_outputs=("zero_expert_num",), extra_label="zero expert {i}"),
    "zaya": RouterLayout(extra_outputs=(1,), extra_label="skip expert"),
    "inkling_text": RouterLayout(scoring="sigmoid", extra_rows=("n_shared_experts",)),
}
DEFAULT = RouterLayout()


def text_config(config):
    """The config of the model that routes: a multimodal wrapper's `text_config`, else the config itself."""
    if isinstance(config, dict):
        return config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def layout_of(config) -> RouterLayout:
    """The family's router layout; `config` is a transformers config or config.json's dict."""
    config = text_config(config)
    return LAYOUTS.get(config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None),
                       DEFAULT)


def config_value(config, keys: tuple[str, ...]) -> int | None:
    """The first positive whole number under one of `keys` (dotted keys walk nested configs or dicts)."""
    config = text_config(config)
    for key in keys:
        value = _lookup(config, key)
        if _whole(value) and value > 0:
            return value
    return None


def config_entry(config, keys: tuple[str, ...]) -> tuple[str, int] | None:
    """The first of `keys` that holds a whole number, and that number, however wrong (for the messages that
    name a config.json's bad value, by its path in the file)."""
    inner = text_config(config)
    prefix = "text_config." if inner is not config else ""
    for key in keys:
        value = _lookup(inner, key)
        if _whole(value):
            return prefix + key, value
    return None


def _lookup(config, key: str):
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else getattr(config, part, None)
    return config


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def expert_count(config) -> int:
    """Routed experts per MoE layer, from a transformers config (a wrapper's text model's)."""
    count = config_value(config, EXPERT_COUNT_KEYS)
    if count:
        return count
    raise StudioError(f"{getattr(config, 'model_type', 'This model')} is not a Mixture-of-Experts model (its config "
                      f"has none of {', '.join(EXPERT_COUNT_KEYS)}). Pick an MoE model, such as a merge.")


def extra_labels(config) -> list[str]:
    """Names of the router's outputs after the routed experts (zero or skip experts), in order."""
    layout = layout_of(config)
    return [layout.extra_label.format(i=i) for i in range(_count(config, layout.extra_outputs))]


def _count(config, keys: tuple[str | int, ...]) -> int:
    return sum(key if isinstance(key, int) else config_value(config, (key,)) or 0 for key in keys)


def router_rows(config) -> int:
    """Rows of each router's weight in the checkpoint: its outputs, and rows used otherwise."""
    return router_width(config) + _count(config, layout_of(config).extra_rows)


def router_width(config) -> int:
    """Outputs of each router: the routed experts and any extra columns."""
    return expert_count(config) + len(extra_labels(config))


def model_class(config, trust_remote_code: bool = False):
    """The class that loads a checkpoint of this config as published: a causal LM, or the multimodal wrapper
    (its text model routes), or the class config.json names when transformers' auto mapping files it elsewhere."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None)
    if trust_remote_code and getattr(config, "auto_map", None):
        return AutoModelForCausalLM
    named = [getattr(transformers, name, None) for name in getattr(config, "architectures", None) or []]
    if named and named[0] is not None:
        return named[0]
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM  # its own error names the model type
