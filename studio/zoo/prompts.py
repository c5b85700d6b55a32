"""Positive prompts for the zoo config, chosen on validation prompts; held-out prompts for the evaluation.

`hidden` gates are sensitive to which prompts they are built from, so candidate sets (pieces of each
domain's training text) are tried and the set whose merge routes the *validation* prompts best is kept.
The routing numbers in README come from separate held-out prompts that no positive prompt overlaps.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Callable

from studio.config import MoEConfig, parse_config, to_yaml
from studio.evaluate import evaluate_routing
from studio.merge import merge
from studio.zoo.corpora import DOMAINS, corpus, held_out_prompts

VALIDATION_SEED = 999
TEST_SEED = 12345


def candidate_prompts(domain: str, count: int, seed: int) -> list[str]:
    """`count` pieces of the domain's training text, each from a line start, 30 to 150 characters long."""
    rng = random.Random(seed)
    text = corpus(domain, 200_000, seed=7)
    prompts = []
    while len(prompts) < count:
        start = text.find("\n", rng.randrange(len(text) - 300)) + 1
        piece = text[start:start + rng.randint(30, 150)]
        if piece.strip():
            prompts.append(piece)
    return prompts


def zoo_config(zoo: str, prompts: dict[str, list[str]], gate_mode: str = "hidden") -> MoEConfig:
    return parse_config({"base_model": f"{zoo}/base", "gate_mode": gate_mode, "dtype": "bfloat16",
                         "experts": [{"source_model": f"{zoo}/{d}", "positive_prompts": prompts[d]}
                                     for d in DOMAINS]})


def routing_score(config: MoEConfig, prompts: dict[str, list[str]]) -> list[float]:
    """Per domain, the share of `prompts` that reach their expert in a majority of layers."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "moe"
        merge(config, out, log=lambda m: None)
        return evaluate_routing(out, prompts).majority_of_layers


def choose_prompts(zoo: str, trials: int = 12, count: int = 16,
                   log: Callable[[str], None] = print) -> dict[str, list[str]]:
    """The candidate set whose worst domain routes best on validation prompts."""
    validation = {d: held_out_prompts(d, 25, seed=VALIDATION_SEED) for d in DOMAINS}
    best, best_score = None, -1.0
    for trial in range(trials):
        prompts = {d: candidate_prompts(d, count, seed=trial * 10 + i) for i, d in enumerate(DOMAINS)}
        shares = routing_score(zoo_config(zoo, prompts), validation)
        log(f"trial {trial}: " + ", ".join(f"{d} {s:.0%}" for d, s in zip(DOMAINS, shares)))
        if min(shares) > best_score:
            best, best_score = prompts, min(shares)
    return best


def test_prompts(positive: dict[str, list[str]], count: int = 25) -> dict[str, list[str]]:
    """Held-out prompts per domain, none overlapping a positive prompt."""
    used = tuple(p.strip() for ps in positive.values() for p in ps)
    return {d: held_out_prompts(d, count, seed=TEST_SEED, exclude=used) for d in DOMAINS}


def write_zoo_files(zoo: str, config_path: Path, prompts_path: Path, trials: int, log=print) -> None:
    positive = choose_prompts(zoo, trials, log=log)
    header = ("# The bundled zoo: a small Mistral-architecture base and four experts fine-tuned from it.\n"
              "# Positive prompts: pieces of each domain's training text, chosen on validation prompts\n"
              "# (python -m studio.zoo prompts). Paths are relative to the project folder.\n")
    config_path.write_text(header + to_yaml(zoo_config(zoo, positive).model_dump(exclude_none=True)), encoding="utf-8")
    prompts_header = "# Held-out prompts for `python -m studio eval-routing`; none overlaps a positive prompt.\n"
    prompts_path.write_text(prompts_header + to_yaml(test_prompts(positive)), encoding="utf-8")
