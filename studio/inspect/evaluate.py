"""Does routing send each domain to its expert? Measured on held-out prompts, layer by layer.

For every prompt and layer, each token's first-choice expert is read from the experts the model runs. Reported
per intended expert: the share of tokens, and of prompts (majority over the prompt's tokens), that reach it in
each layer; the share of prompts that reach it in a majority of layers; a confusion matrix over (prompt, layer)
pairs; and, per layer, how often consecutive tokens keep the same top-1 expert against the random baseline
(Mixtral paper, Table 5).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import yaml

from studio.errors import StudioError
from studio.formatting import format_table
from studio.inspect.routing import load_moe, num_experts, route_sequence, router_labels


@dataclass
class RoutingReport:
    labels: list[str]  # every expert of the model
    intended: list[int]  # expert index of each evaluated group, in order
    token_share: list[list[float]]  # [group][layer]
    prompt_share: list[list[float]]  # [group][layer]
    majority_of_layers: list[float]  # [group]
    every_layer: list[float]  # [group] share of prompts that reach their expert in every layer
    confusion: list[list[int]]  # [group][expert], over (prompt, layer) pairs
    same_expert_rate: list[float]  # [layer]
    prompts: list[int]  # [group] how many prompts

    @property
    def random_same_expert_rate(self) -> float:
        return 1 / len(self.labels)

    def table(self) -> str:
        layers = len(self.same_expert_rate)
        rows = [[self.labels[k], str(n)] + [f"{s:.0%}" for s in shares] + [f"{m:.0%}", f"{e:.0%}"]
                for k, n, shares, m, e in zip(self.intended, self.prompts, self.prompt_share,
                                              self.majority_of_layers, self.every_layer)]
        routed = format_table(["intended expert", "prompts", *(f"L{l}" for l in range(layers)), "majority",
                               "every layer"], rows)
        names = [f"{i}: {Path(label).name}" for i, label in enumerate(self.labels)]  # rows and columns alike
        confusion = format_table(["intended \\ chosen", *names],
                                 [[names[k], *map(str, row)] for k, row in zip(self.intended, self.confusion)])
        same = format_table(["layer", "same top-1 as previous token", "random"],
                            [[str(l), f"{r:.0%}", f"{self.random_same_expert_rate:.0%}"]
                             for l, r in enumerate(self.same_expert_rate)])
        return (f"Prompts whose tokens mostly reach the intended expert, per layer:\n{routed}\n\n"
                f"Confusion over (prompt, layer) pairs:\n{confusion}\n\nConsecutive tokens:\n{same}")


def resolve_expert(key: int | str, labels: list[str]) -> int:
    """An expert named by index, by source model, or by the source model's last path component."""
    if isinstance(key, int) or str(key).isdigit():
        index = int(key)
        if 0 <= index < len(labels):
            return index
    matches = [i for i, label in enumerate(labels) if str(key) in (label, Path(label).name)]
    if len(matches) == 1:
        return matches[0]
    raise StudioError(f"Expert {key!r} names none (or several) of the model's experts: {', '.join(labels)}. "
                      f"Use an index from 0 to {len(labels) - 1} or a source-model name.")


def load_prompts(path: str | Path) -> dict[int | str, list[str]]:
    data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or not all(isinstance(v, list) and v for v in data.values()):
        raise StudioError(f"{path}: expected a mapping from expert (index or source model) to a list of prompts.")
    return data


def evaluate_routing(model_or_path, prompts: dict[int | str, list[str]], tokenizer=None,
                     labels: list[str] | None = None, trust_remote_code: bool = False,
                     progress: Callable[[int, int], None] = lambda done, total: None) -> RoutingReport:
    """Route held-out prompts through an MoE; `model_or_path` is a folder (whose own model code runs only with
    `trust_remote_code`) or an already loaded model. `progress(done, total)` hears of each prompt routed."""
    if isinstance(model_or_path, (str, Path)):
        model, tokenizer = load_moe(model_or_path, trust_remote_code=trust_remote_code)
        labels = labels or router_labels(model_or_path, model.config)
    else:
        model = model_or_path
    labels = labels or [f"expert {i}" for i in range(num_experts(model))]
    experts = len(labels)
    intended, token_share, prompt_share, majority, every, confusion, counts = [], [], [], [], [], [], []
    same, pairs = None, 0
    total, done = sum(len(texts) for texts in prompts.values()), 0
    for key, texts in prompts.items():
        k = resolve_expert(key, labels)
        top1s = []  # each (layers, tokens)
        for text in texts:
            top1s.append(_top1(model, tokenizer, text))
            done += 1
            progress(done, total)
        layers = top1s[0].shape[0]
        tokens = torch.cat(top1s, dim=1)
        majorities = torch.stack([t.mode(dim=1).values for t in top1s])  # (prompts, layers)
        intended.append(k)
        counts.append(len(texts))
        token_share.append((tokens == k).float().mean(dim=1).tolist())
        prompt_share.append((majorities == k).float().mean(dim=0).tolist())
        majority.append(((majorities == k).sum(dim=1) > layers / 2).float().mean().item())
        every.append((majorities == k).all(dim=1).float().mean().item())
        confusion.append(torch.bincount(majorities.flatten(), minlength=experts).tolist())
        kept = sum((t[:, 1:] == t[:, :-1]).sum(dim=1) for t in top1s)
        same = kept if same is None else same + kept
        pairs += sum(t.shape[1] - 1 for t in top1s)
    return RoutingReport(labels, intended, token_share, prompt_share, majority, every, confusion,
                         (same.float() / max(pairs, 1)).tolist(), counts)


def _top1(model, tokenizer, text: str) -> torch.Tensor:
    """(layers, tokens) first-choice expert of each prompt token (of those the model runs, the one of largest
    weight), the prompt encoded as the gates were (BOS + text)."""
    bos = tokenizer.bos_token or ""
    ids = tokenizer(bos + text, add_special_tokens=False)["input_ids"]
    return route_sequence(model, ids).top1()[:, 1 if bos else 0:]
