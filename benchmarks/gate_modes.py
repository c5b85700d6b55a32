"""Gate modes compared on the bundled zoo: does routing reach the right expert, and is the MoE better for it?

For each gate mode the zoo config (assets/examples/zoo-4x.yml, the same prompts every time) is merged, and
the merged MoE is measured on text it never saw:
  * routing: assets/zoo/eval-prompts.yml (25 held-out prompts per domain, none a positive prompt), per layer
    the share of prompts whose tokens mostly reach the intended expert, and the share that do so in every layer;
  * held-out loss per domain: the zoo's held-out corpus (the text of `python -m studio.zoo train`'s loss
    table), mean next-token loss in nats, beside the dense base's;
  * the time to merge, as a ratio to `hidden` in the same run.

Usage: python benchmarks/gate_modes.py [--modes calibrated,hidden,hidden_avg,cheap_embed,random] [--seed 0]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.config import load_config  # noqa: E402
from studio.evaluate import evaluate_routing, load_prompts  # noqa: E402
from studio.merge import MergeOptions, merge  # noqa: E402
from studio.zoo.corpora import DOMAINS  # noqa: E402
from studio.zoo.train import ZOO_DIR, Recipe, held_out_ids, held_out_loss  # noqa: E402


def losses(folder: Path, texts: dict[str, torch.Tensor]) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    return {d: held_out_loss(model, ids, Recipe().seq) for d, ids in texts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modes", default="calibrated,hidden,hidden_avg,cheap_embed,random")
    parser.add_argument("--seed", type=int, default=0, help="for the random gate mode")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    os.chdir(ROOT)  # the config's paths are relative to the project folder
    config = load_config(ROOT / "assets" / "examples" / "zoo-4x.yml")
    prompts = load_prompts(ZOO_DIR / "eval-prompts.yml")
    texts = held_out_ids(AutoTokenizer.from_pretrained(ZOO_DIR / "base"))
    base_loss = losses(ZOO_DIR / "base", texts)
    rows, seconds = [], {}
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory() as folder:
            out = Path(folder) / mode
            start = time.perf_counter()
            merge(config.model_copy(update={"gate_mode": mode}), out, MergeOptions(random_seed=args.seed),
                  log=lambda message: None)
            seconds[mode] = time.perf_counter() - start
            report = evaluate_routing(out, prompts)
            loss = losses(out, texts)
        for k, domain in enumerate(DOMAINS):
            every_layer = report.every_layer[k]
            rows.append([mode, domain, *(f"{s:.0%}" for s in report.prompt_share[k]),
                         f"**{every_layer:.0%}**", f"{report.majority_of_layers[k]:.0%}",
                         f"{loss[domain]:.3f}", f"{base_loss[domain]:.3f}"])
    layers = len(rows[0]) - 6
    print("| gate mode | domain | " + " | ".join(f"L{l}" for l in range(layers)) +
          " | every layer | majority of layers | MoE held-out loss | base loss |")
    print("|---" * (layers + 6) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    reference = seconds.get("hidden")
    print("\nmerge time" + "".join(f", {m} {s:.1f} s" + (f" ({s / reference:.2f}x hidden)" if reference else "")
                                  for m, s in seconds.items()))


if __name__ == "__main__":
    main()
