"""The zoo config's prompts: scored on validation prompts, and the held-out prompts the README reports on.

`hidden` gates are sensitive to which prompts they are built from, so candidate positive prompts are judged by
how a merge built from them routes *validation* prompts (VALIDATION_SEED). The routing numbers in README come
from separate held-out prompts (TEST_SEED) that no positive prompt overlaps, written to eval-prompts.yml.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from studio.build.merge import merge
from studio.config import MoEConfig, load_config, to_yaml
from studio.inspect.evaluate import evaluate_routing
from studio.zoo.corpora import DOMAINS, held_out_prompts

VALIDATION_SEED = 999
TEST_SEED = 12345
COUNT = 25


def positive_prompts(config: MoEConfig) -> dict[str, list[str]]:
    """The config's positive prompts by zoo domain (the experts are the zoo's, in DOMAINS order)."""
    return {domain: list(expert.positive_prompts or []) for domain, expert in zip(DOMAINS, config.experts)}


def validation_prompts() -> dict[str, list[str]]:
    return {d: held_out_prompts(d, COUNT, seed=VALIDATION_SEED) for d in DOMAINS}


def test_prompts(positive: dict[str, list[str]]) -> dict[str, list[str]]:
    """Held-out prompts per domain, none containing or contained in a positive prompt of 20 characters or more
    (the shorter ones are words and fragments, which any text of their domain contains)."""
    used = tuple(p.strip() for ps in positive.values() for p in ps if len(p.strip()) >= 20)
    return {d: held_out_prompts(d, COUNT, seed=TEST_SEED, exclude=used) for d in DOMAINS}


def routing_score(config: MoEConfig, prompts: dict[str, list[str]]) -> list[float]:
    """Per domain, the share of `prompts` that reach their expert in a majority of layers."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "moe"
        merge(config, out, log=lambda m: None)
        return evaluate_routing(out, prompts).majority_of_layers


def score_and_write(config_path: Path, prompts_path: Path, log=print) -> None:
    """Print the config's routing score on validation prompts; write the held-out prompts for it."""
    config = load_config(config_path)
    shares = routing_score(config, validation_prompts())
    log("validation prompts in a majority of layers: " + ", ".join(f"{d} {s:.0%}" for d, s in zip(DOMAINS, shares)))
    header = "# Held-out prompts for `python -m studio eval-routing`; none overlaps a positive prompt.\n"
    prompts_path.write_text(header + to_yaml(test_prompts(positive_prompts(config))), encoding="utf-8")
    log(f"wrote {prompts_path}")
