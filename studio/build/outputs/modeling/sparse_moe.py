"""The routed part of an MoE layer, shared by the model classes MoE Merge Studio writes next to its merges
(needs transformers 5): Mixtral's router over a list of dense MLPs."""

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter


class Router(MixtralTopKRouter):
    """Mixtral's router: (tokens, hidden) -> (logits, top-k weights, top-k experts); the weights are the softmax
    probabilities, renormalised to sum to 1 unless the config says `norm_topk_prob: false`."""

    def __init__(self, config):
        super().__init__(config)
        self.norm_topk_prob = getattr(config, "norm_topk_prob", True)

    def forward(self, hidden_states: torch.Tensor):
        logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        weights, chosen = torch.topk(torch.softmax(logits.float(), dim=-1), self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return logits, weights, chosen


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
