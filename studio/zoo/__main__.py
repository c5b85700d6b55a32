"""`python -m studio.zoo train`: rebuild the bundled zoo models and print their held-out losses."""

from __future__ import annotations

import argparse
from pathlib import Path

from studio.zoo.train import ZOO_DIR, build_zoo, loss_table


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m studio.zoo")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the base and four experts (about 15 minutes on 2 cores)")
    train.add_argument("--out", type=Path, default=ZOO_DIR, help=f"where to save them (default {ZOO_DIR})")
    args = parser.parse_args()
    losses = build_zoo(args.out)
    print("\nHeld-out loss per domain (lower is better):\n")
    print(loss_table(losses))


main()
