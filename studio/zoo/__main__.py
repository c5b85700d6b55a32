"""`python -m studio.zoo train` rebuilds the bundled models; `python -m studio.zoo prompts` scores the zoo config's
positive prompts on validation prompts and writes the held-out prompts that README's routing tables use."""

from __future__ import annotations

import argparse
from pathlib import Path

from studio.zoo.prompts import score_and_write
from studio.zoo.train import ZOO_DIR, build_zoo, loss_table

ROOT = ZOO_DIR.parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m studio.zoo")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the base and four experts (about 11 minutes on 2 cores)")
    train.add_argument("--out", type=Path, default=ZOO_DIR, help=f"where to save them (default {ZOO_DIR})")
    commands.add_parser("prompts", help="score zoo-fragments.yml's positive prompts on validation prompts; write the "
                                        "held-out evaluation prompts")
    args = parser.parse_args()
    if args.command == "prompts":
        score_and_write(ROOT / "assets" / "examples" / "zoo-fragments.yml", ZOO_DIR / "eval-prompts.yml")
        return
    losses = build_zoo(args.out)
    print("\nHeld-out loss per domain (lower is better):\n")
    print(loss_table(losses))


if __name__ == "__main__":
    main()
