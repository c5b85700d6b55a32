"""Facts about the dense model families the studio reads, kept as data.

A family says where a checkpoint keeps its layers, its MLP projections and its embeddings, and which
config.json fields must agree between the base and the experts for their MLPs to be interchangeable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

LAYER_RE = re.compile(r"^(?P<prefix>.*?\blayers)\.(?P<layer>\d+)\.(?P<rest>.+)$")

# config.json fields that must match the base, with the default used when a config omits one.
SHAPE_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads")


@dataclass(frozen=True)
class Family:
    """How one dense architecture lays out its checkpoint."""

    name: str
    model_types: tuple[str, ...]
    # MLP role -> tensor name relative to a layer ("gate" is the SwiGLU gate projection, not the router).
    mlp: dict[str, str] = field(default_factory=lambda: {
        "gate": "mlp.gate_proj.weight", "up": "mlp.up_proj.weight", "down": "mlp.down_proj.weight"})
    # Roles of the MLP's output projection: residual_scale multiplies these.
    output_roles: tuple[str, ...] = ("down",)
    embed: str = "model.embed_tokens.weight"
    lm_head: str = "lm_head.weight"
    layers: str = "model.layers"

    def layer_tensor(self, layer: int, rest: str) -> str:
        return f"{self.layers}.{layer}.{rest}"

    def mlp_tensors(self, layer: int) -> dict[str, str]:
        """Role -> full tensor name of this layer's MLP."""
        return {role: self.layer_tensor(layer, rest) for role, rest in self.mlp.items()}

    def is_mlp(self, name: str) -> bool:
        match = LAYER_RE.match(name)
        return bool(match) and match["rest"] in self.mlp.values()


LLAMA = Family("llama", ("llama",))
MISTRAL = Family("mistral", ("mistral",))
QWEN2 = Family("qwen2", ("qwen2",))
QWEN3 = Family("qwen3", ("qwen3",))
PHI = Family("phi", ("phi",), mlp={"fc1": "mlp.fc1.weight", "fc1_bias": "mlp.fc1.bias",
                                    "fc2": "mlp.fc2.weight", "fc2_bias": "mlp.fc2.bias"},
             output_roles=("fc2", "fc2_bias"))

FAMILIES = {t: f for f in (LLAMA, MISTRAL, QWEN2, QWEN3, PHI) for t in f.model_types}


def family_of(model_type: str | None) -> Family | None:
    return FAMILIES.get(model_type or "")


def shape_facts(config: dict) -> dict[str, int | None]:
    """The fields of a config.json that decide whether MLPs fit together."""
    facts = {key: config.get(key) for key in SHAPE_FIELDS}
    facts["num_key_value_heads"] = kv_heads(config)
    return facts


def kv_heads(config: dict) -> int | None:
    """Key/value heads of a dense config.json: as many as the attention heads unless it says otherwise."""
    return config.get("num_key_value_heads") or config.get("num_attention_heads")


def head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


def layer_of(name: str) -> int | None:
    match = LAYER_RE.match(name)
    return int(match["layer"]) if match else None
