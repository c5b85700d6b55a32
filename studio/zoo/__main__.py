"""`python -m studio.zoo train` rebuilds the bundled models; `python -m studio.zoo prompts` their config."""

from __future__ import annotations

import argparse
from pathlib import Path

from studio.zoo.prompts import write_zoo_files
from studio.zoo.train import ZOO_DIR, build_zoo, loss_table

ROOT = ZOO_DIR.parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m studio.zoo")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the base and four experts (about 10 minutes on 2 cores)")
    train.add_argument("--out", type=Path, default=ZOO_DIR, help=f"where to save them (default {ZOO_DIR})")
    prompts = commands.add_parser("prompts", help="choose the zoo config's positive prompts; write the held-out "
                                                  "evaluation prompts")
    prompts.add_argument("--trials", type=int, default=12, help="candidate prompt sets to try")
    args = parser.parse_args()
    if args.command == "prompts":
        write_zoo_files("assets/zoo", ROOT / "assets" / "examples" / "zoo-4x.yml",
                        ZOO_DIR / "eval-prompts.yml", args.trials)
        return
    losses = build_zoo(args.out)
    print("\nHeld-out loss per domain (lower is better):\n")
    print(loss_table(losses))


if __name__ == "__main__":
    main()
