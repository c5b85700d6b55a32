"""The routed part of an MoE layer, shared by the model classes MoE Merge Studio writes next to its merges
(needs transformers 5): Mixtral's router over a list of dense MLPs."""

import torch
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter


class Router(MixtralTopKRouter):
    """Mixtral's router: (tokens, hidden) -> (logits, top-k weights renormalized to sum to 1, top-k experts)."""


class RoutedExperts(nn.Module):
    """`gate` picks the top k of `experts` for each token; their outputs are summed with the router's weights."""

    def __init__(self, config, experts: list[nn.Module]):
        super().__init__()
        self.gate = Router(config)
        self.experts = nn.ModuleList(experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])
        _, weights, chosen = self.gate(tokens)
        out = torch.zeros_like(tokens)
        for index, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == index)
            if token.numel():
                out.index_add_(0, token, (expert(tokens[token]) * weights[token, slot, None]).to(out.dtype))
        return out.reshape(hidden_states.shape)
