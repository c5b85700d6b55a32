"""`python -m studio.zoo train`: rebuild the bundled zoo models and print their held-out losses."""

from __future__ import annotations

import argparse
from pathlib import Path

from studio.config import load_config, to_yaml
from studio.zoo.corpora import DOMAINS, held_out_prompts
from studio.zoo.train import ZOO_DIR, build_zoo, loss_table


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m studio.zoo")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the base and four experts (about 15 minutes on 2 cores)")
    train.add_argument("--out", type=Path, default=ZOO_DIR, help=f"where to save them (default {ZOO_DIR})")
    prompts = commands.add_parser("prompts", help="write the held-out routing prompts for a zoo config")
    prompts.add_argument("config", type=Path, help="the zoo config whose positive prompts are excluded")
    prompts.add_argument("out", type=Path, help="YAML file to write")
    prompts.add_argument("--count", type=int, default=25, help="prompts per domain")
    args = parser.parse_args()
    if args.command == "prompts":
        write_eval_prompts(args.config, args.out, args.count)
        return
    losses = build_zoo(args.out)
    print("\nHeld-out loss per domain (lower is better):\n")
    print(loss_table(losses))


def write_eval_prompts(config_path: Path, out: Path, count: int) -> None:
    """One list of held-out prompts per domain, keyed by the expert's folder name."""
    config = load_config(config_path)
    used = tuple(p.strip() for e in config.experts for p in e.positive_prompts or [])
    data = {domain: held_out_prompts(domain, count, exclude=used) for domain in DOMAINS}
    header = f"# Held-out prompts for `python -m studio eval-routing`; none overlaps a positive prompt of {config_path.name}.\n"
    out.write_text(header + to_yaml(data), encoding="utf-8")


if __name__ == "__main__":
    main()
