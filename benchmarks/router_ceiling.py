"""How far the routers can go on the zoo, and what the experts' written text lets them reach.

The merged MoE's routers are linear, one per layer, and route 2 of 4 experts per token. Is that what limits an
`expert_text` MoE, or is it the text the routers learn from? This script merges a natural config under
`expert_text` (the studio's default pipeline), then trains the routers of that MoE end to end again
(studio/build/refine.py, with a larger budget than a merge spends, and without the pull towards the layer-by-layer
fit) on:
  * the zoo's training text of each domain (never the held-out text scored here): the routers' ceiling on the
    zoo, as far as this training finds it; in pieces of 256 tokens after BOS, as a user's `calibration_text` is
    read, and again without BOS, as the held-out text is scored (windows that start mid-text);
  * the text the experts write from the config's prompts (studio/build/expert_text.py);
  * the zoo's training text for every domain but one, whose text is the one its expert writes: how good each
    expert's written text is, one at a time.
Each row is scored on the zoo's held-out text: the share of each expert's gain over the base that the MoE keeps,
(base - MoE) / (base - expert), as `quality` measures it.

Usage: python benchmarks/router_ceiling.py [--config sentences] [--steps 60] [--learning-rate 1e-2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from gate_modes import NATURAL, with_domain_text  # noqa: E402
from studio.build.expert_text import expert_texts  # noqa: E402
from studio.build.merge import MergeOptions, merge  # noqa: E402
from studio.build.refine import Budget, refine_routers  # noqa: E402
from studio.config import load_config  # noqa: E402
from studio.formatting import format_table  # noqa: E402
from studio.inspect.quality import mean_loss, zoo_texts  # noqa: E402
from studio.inspect.routing import find_routers, load_moe  # noqa: E402
from studio.prompts import load_tokenizer, prompt_ids  # noqa: E402
from studio.sources import open_models  # noqa: E402
from studio.zoo.corpora import DOMAINS  # noqa: E402  (the experts' order in every natural config of four)


def domain_losses(model, held: dict[str, torch.Tensor]) -> list[float]:
    return [mean_loss(model, held[domain]) for domain in DOMAINS]


def lessons_of(config, sources: dict, tokenizer, after_bos: bool = True) -> list:
    """What each expert of `config` predicts on its calibration text: its own files (in pieces after BOS, or not),
    else the text it writes."""
    bos = [tokenizer.bos_token_id]
    taught = expert_texts(config.experts, [sources[e.source_model] for e in config.experts],
                          sources[config.base_model], lambda prompt: prompt_ids(tokenizer, prompt),
                          lambda text: tokenizer(text, add_special_tokens=False)["input_ids"],
                          bos if after_bos else [], bos,
                          log=lambda message: None)[1]
    return list(taught.values())


def retrained(moe_folder: Path, lessons: list, budget: Budget) -> torch.nn.Module:
    """The MoE in `moe_folder` with its routers trained end to end on `lessons`."""
    model, _ = load_moe(moe_folder, torch.float32)
    refine_routers(model, find_routers(model), lessons, len(DOMAINS), log=lambda message: None, budget=budget)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sentences", help="a config of benchmarks/natural/ with the zoo's "
                                                              "four experts in the order code, math, stories, chat")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--learning-rate", type=float, default=1e-2)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config(NATURAL / f"{args.config}.yml").model_copy(update={"gate_mode": "expert_text"})
    budget = Budget(steps=args.steps, learning_rate=args.learning_rate, labels=0.0)
    with tempfile.TemporaryDirectory() as folder:
        moe_folder = Path(folder) / "moe"
        started = time.perf_counter()
        merge(config, moe_folder, MergeOptions(random_seed=0), log=lambda message: None)
        print(f"Merged {args.config} under expert_text in {time.perf_counter() - started:.0f} s", flush=True)
        sources = open_models([config.base_model, *(e.source_model for e in config.experts)])
        tokenizer = load_tokenizer(sources[config.base_model])
        held = zoo_texts(tokenizer)
        base = domain_losses(AutoModelForCausalLM.from_pretrained(config.base_model, dtype=torch.float32), held)
        expert = [mean_loss(AutoModelForCausalLM.from_pretrained(e.source_model, dtype=torch.float32), held[d])
                  for e, d in zip(config.experts, DOMAINS)]
        written = lessons_of(config, sources, tokenizer)
        domain_text = with_domain_text(config, Path(folder))
        given = lessons_of(domain_text, sources, tokenizer)
        mid_text = lessons_of(domain_text, sources, tokenizer, after_bos=False)
        runs = {f"as merged ({args.config}, expert_text)": lambda: load_moe(moe_folder, torch.float32)[0],
                "routers retrained on the zoo's training text": lambda: retrained(moe_folder, given, budget),
                "... on the same text, without BOS": lambda: retrained(moe_folder, mid_text, budget),
                "routers retrained on the experts' written text": lambda: retrained(moe_folder, written, budget)}
        for index, domain in enumerate(DOMAINS):
            mixed = [lesson for lesson in given if lesson.expert != index] + \
                    [lesson for lesson in written if lesson.expert == index]
            runs[f"... on training text, the {domain} expert's written"] = lambda mixed=mixed: retrained(
                moe_folder, mixed, budget)
        rows = []
        for label, model_of in runs.items():
            started = time.perf_counter()
            losses = domain_losses(model_of(), held)
            kept = [(b - m) / (b - e) for b, m, e in zip(base, losses, expert)]
            rows.append([label, *(f"{share:.0%}" for share in kept), f"{time.perf_counter() - started:.0f} s"])
            print(f"  {label}: {' / '.join(rows[-1][1:5])}", flush=True)
    print(f"\nShare of each expert's gain kept on the zoo's held-out text (retrained: {args.steps} steps at "
          f"learning rate {args.learning_rate}, without the fit's pull)\n")
    print(format_table(["routers", *DOMAINS, "time"], rows))


if __name__ == "__main__":
    main()
