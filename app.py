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
    args = parser.parse_args()

    from studio.ui.build import build_app

    args.workspace.mkdir(parents=True, exist_ok=True)
    build_app(args.workspace.resolve()).queue().launch(server_name=args.host, server_port=args.port,
                                                        share=args.share)


if __name__ == "__main__":
    main()
