"""Where in a scored window an `expert_text` MoE loses what it loses of each expert's gain.

`quality` (studio/inspect/quality.py) scores held-out text in consecutive windows of 128 tokens, and the zoo's
experts were trained on such windows: a window starts mid-text, with no BOS and no context. This script merges a
natural config under `expert_text`, then splits each domain's held-out tokens by their position in the window and
reports, per span of positions, the share of the expert's gain over the base found there and the share of it the
MoE keeps. A last row per domain scores the same MoE with its routers overruled over the first 8 positions of each
window (each layer sends those tokens to the domain's own expert alone): what routing at a window's start costs.
The overruling works on transformers' Mixtral router, the zoo's layout.

Usage: python benchmarks/window_starts.py [--config sentences] [--seed 0]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from gate_modes import NATURAL  # noqa: E402
from studio.build.merge import MergeOptions, merge  # noqa: E402
from studio.config import load_config  # noqa: E402
from studio.formatting import format_table  # noqa: E402
from studio.inspect.quality import WINDOW, scored_windows, zoo_texts  # noqa: E402
from studio.inspect.routing import find_routers, load_moe  # noqa: E402
from studio.zoo.corpora import DOMAINS  # noqa: E402  (the experts' order in every natural config of four)

SPANS = [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, WINDOW - 1)]  # positions of the predicting token
OVERRULED = 8  # first positions of each window whose routing is overruled in the last row


@torch.inference_mode()
def token_losses(model, ids: torch.Tensor) -> torch.Tensor:
    """(windows, WINDOW - 1): the next-token loss at each position of each of `quality`'s scored windows."""
    losses = []
    for chunk in scored_windows(ids).split(16):
        logits = model(input_ids=chunk).logits[:, :-1].float()
        losses.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="none"))
    return torch.cat(losses)


@contextmanager
def overruled(model, expert: int, positions: int):
    """Every router of `model` sends the first `positions` tokens of each window to `expert` alone."""
    def hook(router, inputs, outputs):
        logits, scores, indices = outputs
        scores, indices = scores.clone().view(-1, WINDOW, scores.shape[-1]), indices.clone().view(-1, WINDOW,
                                                                                                 indices.shape[-1])
        scores[:, :positions] = 0.0
        scores[:, :positions, 0] = 1.0
        indices[:, :positions, 0] = expert
        return logits, scores.flatten(0, 1), indices.flatten(0, 1)

    hooks = [router.register_forward_hook(hook) for router in find_routers(model).values()]
    try:
        yield model
    finally:
        for handle in hooks:
            handle.remove()


def kept(base: torch.Tensor, expert: torch.Tensor, moe: torch.Tensor, start: int, end: int) -> tuple[float, float]:
    """Over positions [start, end) of every window: the share of the expert's whole gain found there, and the
    share of that part the MoE keeps."""
    gain = (base - expert)[:, start:end].sum()
    whole = (base - expert).sum()
    return float(gain / whole), float((base - moe)[:, start:end].sum() / gain)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sentences", help="a config of benchmarks/natural/ with the zoo's "
                                                              "four experts in the order code, math, stories, chat")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    config = load_config(NATURAL / f"{args.config}.yml").model_copy(update={"gate_mode": "expert_text"})
    with tempfile.TemporaryDirectory() as folder:
        merge(config, Path(folder) / "moe", MergeOptions(random_seed=args.seed), log=lambda message: None)
        moe, tokenizer = load_moe(Path(folder) / "moe")
    held = zoo_texts(tokenizer)
    base = AutoModelForCausalLM.from_pretrained(config.base_model, dtype=torch.float32).eval()
    rows = []
    for index, (domain, entry) in enumerate(zip(DOMAINS, config.experts)):
        expert = AutoModelForCausalLM.from_pretrained(entry.source_model, dtype=torch.float32).eval()
        losses = [token_losses(model, held[domain]) for model in (base, expert, moe)]
        with overruled(moe, index, OVERRULED):
            sure = token_losses(moe, held[domain])
        spans = [kept(*losses, start, end) for start, end in SPANS]
        rows.append([domain, *(f"{share:.0%} / {moe_kept:.0%}" for share, moe_kept in spans),
                     f"{kept(*losses, 0, WINDOW - 1)[1]:.0%}",
                     f"{kept(*losses[:2], sure, 0, WINDOW - 1)[1]:.0%}"])
    print(f"Per span of positions in a window of {WINDOW} tokens: the share of the expert's gain over the base "
          f"found there / the share of it the MoE keeps ({args.config}, expert_text, seed {args.seed})\n")
    print(format_table(["domain", *(f"{s + 1}" if e == s + 1 else f"{s + 1}-{e}" for s, e in SPANS), "whole window",
                        f"whole, first {OVERRULED} routed to the expert"], rows))


if __name__ == "__main__":
    main()
