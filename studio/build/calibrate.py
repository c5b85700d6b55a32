"""Calibrated gates: each layer's router fitted on what that router will really see.

mergekit's `hidden` gates average the residual stream *entering* a layer at the prompts' last token, while the
merged model's router reads `post_attention_layernorm(h + attention)` at every token, and the mean states of
all experts share one large direction, so the softmax often sends every token to one expert. Here the merged
model is run layer by layer (StreamedMoE) over every token of the prompts: at layer l the router inputs are
collected, a router is fitted to tell the experts apart (multinomial logistic regression, a few LBFGS steps
on the CPU), and the tokens are then routed by it through the experts' MLPs, so layer l + 1 is fitted on the
inputs that the routers below really produce.

A token of a positive prompt of expert e wants e; a token of a negative prompt of e wants any expert but e.
Each group of prompts weighs the same however many tokens it has. The fitted router is then scaled so that
the mean top-1 probability over the prompt tokens is CONFIDENCE: neither flat (top-k weights would mix the
experts evenly) nor one-hot (the second expert would never count).
"""

from __future__ import annotations

from collections import Counter
from typing import Callable, Hashable

import torch
import torch.nn.functional as F

from studio.build.forward import StreamedMoE
from studio.config import Expert

CONFIDENCE = 0.8
L2 = 1e-1  # on the router applied to unit-RMS inputs
STEPS = 100


def prompt_targets(experts: list[Expert]) -> dict[str, torch.Tensor]:
    """Each prompt's wanted distribution over experts: uniform over the experts it is a positive prompt of, else
    uniform over the experts it is not a negative prompt of."""
    n = len(experts)
    positive: dict[str, set[int]] = {}
    negative: dict[str, set[int]] = {}
    for e, expert in enumerate(experts):
        for prompt in expert.positive_prompts or []:
            positive.setdefault(prompt, set()).add(e)
        for prompt in expert.negative_prompts or []:
            negative.setdefault(prompt, set()).add(e)
    targets = {}
    for prompt in dict.fromkeys([*positive, *negative]):
        wanted = positive.get(prompt) or set(range(n)) - negative[prompt]
        if wanted:
            targets[prompt] = torch.zeros(n).index_fill_(0, torch.tensor(sorted(wanted)), 1.0 / len(wanted))
    return targets


def fit_router(x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, confidence: float | None = CONFIDENCE,
               steps: int = STEPS, l2: float = L2) -> torch.Tensor:
    """Router rows (experts, hidden) whose softmax over `x` (tokens, hidden) matches `targets` (tokens, experts),
    each token counted with its weight; scaled to the wanted mean top-1 probability, or, with `confidence` None,
    left with the fit's own probabilities (sure where the tokens are told apart, hesitant where they are not)."""
    x = x.float()
    rms = x.pow(2).mean().sqrt().clamp_min(1e-8)
    weights = weights / weights.sum()
    with torch.inference_mode(False):  # a caller's inference mode would forbid the fit's gradients
        unit, targets, weights = (x / rms).clone(), targets.clone(), weights.clone()
        router = torch.zeros(targets.shape[1], x.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([router], max_iter=steps, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        logp = F.log_softmax(unit @ router.T, dim=-1)
        value = -(weights * (targets * logp).sum(dim=-1)).sum() + l2 * router.pow(2).sum()
        value.backward()
        return value

    with torch.inference_mode(False), torch.enable_grad():
        optimizer.step(loss)
    router = router.detach() / rms
    if confidence is None:
        return router
    return router * _scale_for_confidence(x @ router.T, weights, confidence)


def ridge_router(x: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor, confidence: float | None = CONFIDENCE,
                 l2: float = L2) -> torch.Tensor:
    """DUME's closed-form router (arXiv 2603.29765): the ridge regression of `targets` on `x`, each token counted
    with its weight, scaled to the wanted mean top-1 probability (its raw outputs lie near 0 and 1, whose softmax
    would mix the experts almost evenly). A baseline for `fit_router`, which fits the softmax itself."""
    x = x.float()
    rms = x.pow(2).mean().sqrt().clamp_min(1e-8)
    unit, weights = x / rms, weights / weights.sum()
    weighted = unit * weights[:, None]
    gram = unit.T @ weighted + l2 * torch.eye(x.shape[1])
    router = torch.linalg.solve(gram, weighted.T @ targets).T / rms
    if confidence is None:
        return router
    return router * _scale_for_confidence(x @ router.T, weights, confidence)


def _scale_for_confidence(logits: torch.Tensor, weights: torch.Tensor, confidence: float) -> float:
    """The factor on the logits whose softmax has the given weighted mean top-1 probability (bisection in log space)."""

    def mean_top1(scale: float) -> float:
        return float((weights * (logits * scale).softmax(dim=-1).max(dim=-1).values).sum())

    if logits.abs().max() < 1e-8:
        return 1.0  # nothing separates the experts here; a flat router is the honest answer
    low, high = -12.0, 12.0  # log of the scale
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_top1(2.0 ** middle) < confidence else (low, middle)
    return 2.0 ** ((low + high) / 2)


def calibrated_gates(moe: StreamedMoE, batches: list[tuple[list[Hashable], torch.Tensor, torch.Tensor]],
                     targets: dict[Hashable, torch.Tensor], ignored_ids: list[int], log: Callable[[str], None] = print,
                     check: Callable[[], None] = lambda: None, confidence: float | None = CONFIDENCE,
                     l2: float = L2, fit: Callable[..., torch.Tensor] = fit_router,
                     on_layer: Callable[[int], None] = lambda layer: None,
                     weights: dict[Hashable, torch.Tensor] | None = None) -> torch.Tensor:
    """G (layers, experts, hidden): each layer's router fitted on the router inputs of the sequences' tokens.

    `batches` holds (keys, ids, mask), left-padded, a key per sequence (a prompt, or a piece of calibration text);
    `targets` gives each key's wanted distribution over experts. Tokens in `ignored_ids` (BOS, the same in every
    sequence) are left out of the fit. `fit` is `fit_router` or `ridge_router`; `confidence` and `l2` as there;
    `on_layer(layer)` hears of each layer fitted. `weights` may give a sequence's tokens (one per position) weights
    relative to each other; its group still weighs as much as every other group.
    """
    token_targets, token_weights, keep = _token_targets(batches, targets, ignored_ids, weights or {})
    gates = []

    def fit_layer(layer: int, inputs: list[torch.Tensor]) -> torch.Tensor:
        x = torch.cat([states[mask.to(states.device)] for states, mask in zip(inputs, keep)]).cpu()
        router = fit(x, token_targets, token_weights, confidence, l2=l2)
        accuracy = _accuracy(x @ router.T, token_targets)
        log(f"Layer {layer}: router fitted on {x.shape[0]} tokens; top-1 agrees with the intended expert on "
            f"{accuracy:.0%} of them")
        gates.append(router)
        on_layer(layer)
        return router

    moe.run([moe.start(ids, mask) for _, ids, mask in batches], fit_layer, check)
    return torch.stack(gates)


def _token_targets(batches, targets, ignored_ids, relative: dict[Hashable, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Per kept token (in batch order): its target distribution and weight; per batch: which positions are kept.
    Each group of sequences (by target) weighs 1 in all, shared by its tokens in proportion to their `relative`
    weights (1 for a sequence without any)."""
    rows, groups, shares, keep = [], [], [], []
    for prompts, ids, mask in batches:
        kept = mask.bool() & ~torch.isin(ids, torch.tensor(ignored_ids, dtype=ids.dtype))
        keep.append(kept)
        for prompt, row, length in zip(prompts, kept, mask.sum(dim=1).tolist()):
            count = int(row.sum())
            rows += [targets[prompt]] * count
            groups += [tuple(targets[prompt].tolist())] * count
            share = torch.ones(len(row))
            if prompt in relative:  # the sequence is left-padded: its positions are the row's last ones
                assert len(relative[prompt]) == length, f"{prompt}: {len(relative[prompt])} weights, {length} tokens"
                share[len(row) - length:] = relative[prompt]
            shares += share[row].tolist()
    per_group = Counter()
    for group, share in zip(groups, shares):
        per_group[group] += share
    weights = torch.tensor([share / per_group[group] for group, share in zip(groups, shares)])
    return torch.stack(rows), weights, keep


def _accuracy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    wanted = targets.gather(1, logits.argmax(dim=-1, keepdim=True)).squeeze(1) > 0
    return float(wanted.float().mean())
