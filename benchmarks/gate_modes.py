"""Gate modes compared on the bundled zoo, with prompts written the way people write them.

Configs: benchmarks/natural/*.yml, written by hand as the guides and model cards write them (whole sentences,
questions and code lines; Beyonder-style bare keywords; Maixtchup-style role descriptions), at most 8 prompts
per expert, none taken from the zoo's corpora. Each is merged once per gate mode and measured on what it never
saw:
  * routing: benchmarks/natural/eval-prompts.yml (12 natural held-out prompts per domain, written apart from
    the configs): the share of prompts whose tokens mostly reach their expert in a majority of layers, and in
    every layer;
  * quality: the zoo's held-out text per domain (studio.inspect.quality): the MoE's loss and the share of the expert's
    gain over the base that it recovers, (base - MoE) / (base - expert);
  * the time to merge, as a ratio to `hidden` in the same run.

`expert_text/fitted` is expert_text with its routers as fitted layer by layer (`--no-refine`); `expert_text`
refines them end to end once written (studio/build/refine.py). The config `domain-text` (not run by default) is
`sentences` with each expert's `calibration_text` taken from the zoo's training corpora: routers from the user's
own domain text instead of text the experts write. The config `chat-format` (not run by default either) holds
instructions and questions under `prompt_format: chat`, written after the others; so are `two-experts` and
`three-experts` (not run by default), with fewer experts and fewer prompts (4 and 3 per expert), and `mixed`
(not run by default: four experts, five prompts each), written later still; and later again `casual` (four short
prompts per expert), `topics` (topic words) and `half-keywords` (two experts by sentences, two by bare keywords),
none run by default. Last, with a second set of held-out prompts (`--prompts benchmarks/natural/eval-prompts-2.yml`,
10 per domain) and before anything was measured on them: `one-line` (one role sentence per expert, as the Maixtchup
guide), `eight-sentences`, `with-negatives` (negative prompts too) and `fragments` (openings, as the mergekit docs'
clown-car config).

Usage: python benchmarks/gate_modes.py [--configs sentences,keywords,assistant] [--modes hidden,cheap_embed,
       calibrated,expert_text/fitted,expert_text,expert_text_ridge] [--seed 0]
       [--prompts benchmarks/natural/eval-prompts.yml]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.build.merge import MergeOptions, merge  # noqa: E402
from studio.config import load_config  # noqa: E402
from studio.gate_modes import gate_mode as gate_mode_of  # noqa: E402
from studio.inspect.evaluate import evaluate_routing, load_prompts  # noqa: E402
from studio.inspect.quality import measure_quality  # noqa: E402
from studio.zoo.corpora import corpus  # noqa: E402

NATURAL = ROOT / "benchmarks" / "natural"
DOMAIN_TEXT_CHARS = 60_000  # enough for expert_text's 6144 tokens per expert


def with_domain_text(config, folder: Path):
    """The config with each expert's `calibration_text`: text of its domain from the zoo's training corpora (never
    the held-out text that quality is measured on), as a user would give their own domain text."""
    experts = []
    for expert in config.experts:
        path = folder / f"{Path(expert.source_model).name}.txt"
        path.write_text(corpus(Path(expert.source_model).name, DOMAIN_TEXT_CHARS, seed=7), encoding="utf-8")
        experts.append(expert.model_copy(update={"calibration_text": [str(path)]}))
    return config.model_copy(update={"experts": experts})


def measure(config_path: Path, mode: str, seed: int, prompts: dict) -> tuple[list[list[str]], float]:
    """`mode` is a gate mode, or `expert_text/fitted` for expert_text's routers as fitted (`--no-refine`).
    The config `domain-text` is `sentences` with each expert's domain text as `calibration_text` (for the modes
    that read it; the others see `sentences`)."""
    gate_mode, _, variant = mode.partition("/")
    domain_text = config_path.stem == "domain-text"
    config = load_config(NATURAL / "sentences.yml" if domain_text else config_path)
    config = config.model_copy(update={"gate_mode": gate_mode})
    with tempfile.TemporaryDirectory() as folder:
        if domain_text and gate_mode_of(gate_mode).reads_expert_text:
            config = with_domain_text(config, Path(folder))
        out = Path(folder) / "moe"
        start = time.perf_counter()
        merge(config, out, MergeOptions(random_seed=seed, refine_routers=variant != "fitted"), log=lambda message: None)
        seconds = time.perf_counter() - start
        routing = evaluate_routing(out, {e.source_model: prompts[e.source_model] for e in config.experts})
        quality = measure_quality(out, "zoo", max_tokens=10**9, log=lambda message: None)
    group = {routing.labels[k]: i for i, k in enumerate(routing.intended)}  # each expert's row of the routing
    rows = []
    for domain in quality.domains:  # in the zoo's order of domains, not the config's order of experts
        name, k = Path(domain.expert).name, group[domain.expert]
        rows.append([config_path.stem, mode, name, f"{routing.majority_of_layers[k]:.0%}",
                     f"{routing.every_layer[k]:.0%}", f"{domain.moe:.3f}", f"{domain.base:.3f}",
                     f"{domain.expert_alone:.3f}", f"**{domain.recovered:.0%}**"])
    return rows, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="sentences,keywords,assistant",
                        help="names in benchmarks/natural/, or paths to other zoo configs")
    parser.add_argument("--modes", default="hidden,cheap_embed,calibrated,expert_text/fitted,expert_text,"
                                           "expert_text_ridge")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prompts", default=str(NATURAL / "eval-prompts.yml"), help="held-out prompts per expert")
    args = parser.parse_args()
    prompts = load_prompts(Path(args.prompts).resolve())
    os.chdir(ROOT)  # the configs' paths are relative to the project folder
    rows, seconds = [], {}
    for name in args.configs.split(","):
        path = Path(name) if name.endswith(".yml") else NATURAL / f"{name}.yml"
        for mode in args.modes.split(","):
            found, seconds[(path.stem, mode)] = measure(path, mode, args.seed, prompts)
            rows += found
            print(f"{path.stem} / {mode}: {seconds[(path.stem, mode)]:.1f} s", file=sys.stderr, flush=True)
    print("| config | gate mode | domain | held-out prompts to their expert, majority of layers | every layer "
          "| MoE loss | base | expert | expert's gain recovered |")
    print("|---" * 9 + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    for config in dict.fromkeys(c for c, _ in seconds):
        reference = seconds.get((config, "hidden"))
        print(f"\nmerge time, {config}: " + ", ".join(
            f"{m} {s:.1f} s" + (f" ({s / reference:.1f}x hidden)" if reference else "")
            for (c, m), s in seconds.items() if c == config))


if __name__ == "__main__":
    main()
