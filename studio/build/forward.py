"""A layer-at-a-time forward pass of Llama-shaped decoders (llama, mistral, qwen2, qwen3), for the hidden-gate pass.

The gates need only the residual stream entering each layer, so the base model never has to be in memory
whole: layer l's weights are read, every prompt is pushed through it, and they are dropped before layer
l + 1 is read. Peak memory is one layer plus the prompts' activations, instead of the whole base model
(the usual cause of out-of-memory failures with mergekit-moe's hidden gates). Computed in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from studio.families import Family, head_dim, kv_heads
from studio.sources import ModelSource

STREAMABLE = ("llama", "mistral", "qwen2", "qwen3")
ROPE_TYPES = ("default", "linear", "llama3")


def rope_settings(config: dict) -> tuple[float, dict]:
    """(theta, scaling) from either the 4.x (`rope_theta`, `rope_scaling`) or 5.x (`rope_parameters`) keys."""
    params = dict(config.get("rope_parameters") or {})
    scaling = dict(config.get("rope_scaling") or {}) or params
    theta = config.get("rope_theta") or params.get("rope_theta") or 10000.0
    return float(theta), scaling


def why_not_streamable(config: dict, longest_prompt: int) -> str | None:
    """Why this config needs transformers' own forward instead, or None."""
    if config.get("model_type") not in STREAMABLE:
        return f"model_type {config.get('model_type')!r} has no streamed forward"
    rope_type = rope_settings(config)[1].get("rope_type") or rope_settings(config)[1].get("type") or "default"
    if rope_type not in ROPE_TYPES:
        return f"rope type {rope_type!r}"
    if config.get("hidden_act", "silu") != "silu":
        return f"activation {config.get('hidden_act')!r}"
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window and longest_prompt > window:
        return "prompts longer than the sliding window"
    return None


def inverse_frequencies(config: dict, head_dim: int) -> torch.Tensor:
    theta, scaling = rope_settings(config)
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "linear":
        return inv / scaling["factor"]
    if rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_context = scaling["original_max_position_embeddings"]
        wavelength = 2 * math.pi / inv
        scaled = torch.where(wavelength > old_context / low, inv / factor, inv)
        smooth = (old_context / wavelength - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= old_context / high) & (wavelength <= old_context / low)
        return torch.where(medium, blended, scaled)
    return inv


@dataclass
class Batch:
    """Left-padded prompts going through the layers together."""

    mask: torch.Tensor  # (batch, seq) 1 for real tokens
    attention: torch.Tensor  # (batch, 1, seq, seq) bool, True where a query may look
    cos: torch.Tensor  # (batch, 1, seq, head_dim)
    sin: torch.Tensor
    hidden: torch.Tensor  # (batch, seq, hidden)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class StreamedDecoder:
    """Reads one decoder layer at a time from a checkpoint and applies it to batches of prompts."""

    def __init__(self, source: ModelSource, family: Family, device: str = "cpu"):
        c = source.config
        self.source, self.family, self.device = source, family, torch.device(device)
        self.heads, self.kv_heads, self.head_dim = c["num_attention_heads"], kv_heads(c), head_dim(c)
        self.eps = c.get("rms_norm_eps", 1e-6)
        self.inv_freq = inverse_frequencies(c, self.head_dim).to(self.device)

    def _weight(self, layer: int, rest: str, source: ModelSource | None = None) -> torch.Tensor | None:
        source = source or self.source
        name = self.family.layer_tensor(layer, rest)
        return source.read(name).to(self.device, torch.float32) if source.has(name) else None

    def start(self, ids: torch.Tensor, mask: torch.Tensor) -> Batch:
        ids, mask = ids.to(self.device), mask.to(self.device)
        # Only the prompt tokens' rows of the embedding are read.
        hidden = self.source.read_rows(self.family.embed, ids.flatten().tolist()).to(self.device, torch.float32)
        positions = (mask.cumsum(-1) - 1).clamp_min(0).float()
        angles = positions[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)[:, None]
        seq = ids.shape[1]
        causal = torch.ones(seq, seq, dtype=torch.bool, device=self.device).tril()
        # Padding queries may see themselves, so no row is empty (an empty row would give NaN).
        attention = (causal & mask[:, None, None, :].bool()) | torch.eye(seq, dtype=torch.bool, device=self.device)
        return Batch(mask, attention, angles.cos(), angles.sin(), hidden.view(*ids.shape, -1))

    def attention(self, layer: int) -> Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]:
        """Load layer `layer`'s attention half: a function giving, for a batch, the residual stream after
        attention and the normalised MLP input (what an MoE layer's router sees)."""
        w = {rest: self._weight(layer, rest) for rest in (
            "input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
            "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight", "self_attn.q_proj.bias",
            "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.q_norm.weight", "self_attn.k_norm.weight")}

        def project(x: torch.Tensor, name: str, heads: int) -> torch.Tensor:
            y = F.linear(x, w[f"self_attn.{name}.weight"], w[f"self_attn.{name}.bias"])
            y = y.view(*x.shape[:2], heads, self.head_dim)
            norm = w.get(f"self_attn.{name[0]}_norm.weight")  # qwen3 normalises each head of q and k
            return (y if norm is None else _rms_norm(y, norm, self.eps)).transpose(1, 2)

        def apply(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
            x = _rms_norm(batch.hidden, w["input_layernorm.weight"], self.eps)
            q = _rotate(project(x, "q_proj", self.heads), batch.cos, batch.sin)
            k = _rotate(project(x, "k_proj", self.kv_heads), batch.cos, batch.sin)
            v = project(x, "v_proj", self.kv_heads)
            groups = self.heads // self.kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.attention)
            attended = attended.transpose(1, 2).reshape(*x.shape[:2], -1)
            h = batch.hidden + F.linear(attended, w["self_attn.o_proj.weight"])
            return h, _rms_norm(h, w["post_attention_layernorm.weight"], self.eps)

        return apply

    def mlp(self, layer: int, source: ModelSource | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """Load layer `layer`'s SwiGLU MLP from `source` (default: the decoder's own checkpoint)."""
        gate, up, down = (self._weight(layer, self.family.mlp[role], source) for role in ("gate", "up", "down"))
        return lambda x: F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)

    def layer(self, layer: int) -> Callable[[Batch], None]:
        """Load layer `layer` and return a function that moves a batch through it in place."""
        attention, mlp = self.attention(layer), self.mlp(layer)

        def apply(batch: Batch) -> None:
            h, x = attention(batch)
            batch.hidden = h + mlp(x)

        return apply


@dataclass
class Routing:
    """What one MoE layer's router decided for a batch: softmax over experts, the chosen ones and their weights."""

    probabilities: torch.Tensor  # (batch, seq, experts)
    experts: torch.Tensor  # (batch, seq, k), best first
    weights: torch.Tensor  # (batch, seq, k), the share of each chosen expert in the layer's output


def route(x: torch.Tensor, router: torch.Tensor, top_k: int, renormalize: bool = True) -> Routing:
    """Mixtral's routing: softmax of the router logits, the top k, their weights renormalised to sum to one
    (`renormalize`; Qwen-MoE configs may turn that off with norm_topk_prob)."""
    probabilities = F.softmax(F.linear(x, router), dim=-1)
    weights, experts = probabilities.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(probabilities, experts, weights)


class StreamedMoE:
    """The merged model's forward pass before the merge exists, one layer's weights in memory at a time.

    Attention and norms come from the base, each expert's MLP from its source model (scaled by its
    residual_scale), and the tokens are routed as the merged model routes them. `routers(layer, inputs)`
    supplies layer l's router (experts, hidden) from the router inputs of every batch, so a caller can fit it
    there (calibrated gates) or look it up (preview).
    """

    def __init__(self, base: ModelSource, family: Family, experts: list[ModelSource], scales: list[float | None],
                 top_k: int, renormalize: bool = True, device: str = "cpu", shared: ModelSource | None = None,
                 shared_scale: float = 1.0):
        self.decoder = StreamedDecoder(base, family, device)
        self.experts, self.scales = experts, scales
        self.top_k, self.renormalize = top_k, renormalize
        self.shared, self.shared_scale = shared, shared_scale  # a shared expert sees every token
        self.layers = base.config["num_hidden_layers"]

    def start(self, ids: torch.Tensor, mask: torch.Tensor) -> Batch:
        return self.decoder.start(ids, mask)

    def run(self, batches: list[Batch], routers: Callable[[int, list[torch.Tensor]], torch.Tensor],
            check: Callable[[], None] = lambda: None, shared_gates: torch.Tensor | None = None) -> list[list[Routing]]:
        """Push `batches` through every layer; returns each layer's routing of each batch.

        `shared_gates` (layers, hidden): the shared expert's sigmoid gate rows (Qwen2-MoE); without them a shared
        expert adds its whole output."""
        decisions = []
        for layer in range(self.layers):
            check()
            attention = self.decoder.attention(layer)
            states = [attention(batch) for batch in batches]
            router = routers(layer, [x for _, x in states]).to(self.decoder.device, torch.float32)
            routings = [route(x, router, self.top_k, self.renormalize) for _, x in states]
            decisions.append(routings)
            if layer + 1 < self.layers:  # the last layer's output is never needed
                self._mix_experts(layer, batches, states, routings)
                gate = None if shared_gates is None else shared_gates[layer].to(self.decoder.device, torch.float32)
                self._add_shared_expert(layer, batches, states, gate)
        return decisions

    def _add_shared_expert(self, layer: int, batches: list[Batch], states: list, gate: torch.Tensor | None) -> None:
        if self.shared is None:
            return
        mlp = self.decoder.mlp(layer, self.shared)
        for batch, (_, x) in zip(batches, states):
            share = torch.sigmoid(x @ gate)[..., None] if gate is not None else 1.0
            batch.hidden += share * self.shared_scale * mlp(x)

    def _mix_experts(self, layer: int, batches: list[Batch], states: list, routings: list[Routing]) -> None:
        for batch, (h, _) in zip(batches, states):
            batch.hidden = h
        for j, (source, scale) in enumerate(zip(self.experts, self.scales)):  # one expert's MLP loaded at a time
            mlp = self.decoder.mlp(layer, source)
            for batch, (_, x), routing in zip(batches, states, routings):
                weight = (routing.weights * (routing.experts == j)).sum(dim=-1)
                rows = weight > 0
                if rows.any():
                    batch.hidden[rows] += (weight[rows, None] * (scale or 1.0)) * mlp(x[rows])
