"""Start MoE Merge Studio: `python app.py` serves it on http://127.0.0.1:7860."""

from __future__ import annotations

import argparse
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description="MoE Merge Studio")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also publish a temporary public Gradio link")
    parser.add_argument("--workspace", type=Path, default=Path("workspace"), help="folder where merges are written")
    parser.add_argument("--device", default="auto", help="where chat models run: auto (GPUs, then CPU), cpu or cuda")
    args = parser.parse_args()

    from studio.app.ui.app import build_app, launch

    args.workspace.mkdir(parents=True, exist_ok=True)
    launch(build_app(args.workspace.resolve(), device=args.device), server_name=args.host, server_port=args.port,
           share=args.share)


if __name__ == "__main__":
    main()
