#!/usr/bin/env bash
# A virtualenv with transformers 4.57.x, for tests/test_transformers4.py (our output must load in 4.x and 5.x).
#
# The venv (.venv-tf4 at the repo root) sees the system site-packages (torch, safetensors, numpy, ...) and
# holds only what transformers 4.57 needs at other versions (transformers, tokenizers<=0.23.0,
# huggingface_hub<1.0). The system site-packages are never modified, and torch is pinned by a constraints
# file so pip can never swap it for another build.
#
# Idempotent: a second run finds the venv ready and returns at once. FORCE=1 re-runs pip anyway.
# PYTHON picks the interpreter the venv is made from (default: python3, the one with torch 2.13.0).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-tf4"
CONSTRAINTS="$ROOT/.ci/constraints-tf4.txt"
PYTHON="${PYTHON:-python3}"
SPEC=("transformers>=4.57,<4.58" "tokenizers<=0.23.0" "huggingface_hub<1.0")

check() {
    "$VENV/bin/python" - <<'PY'
import sys
import torch, transformers, tokenizers, huggingface_hub
assert transformers.__version__.startswith("4.57."), transformers.__version__
assert torch.__version__.split("+")[0] == "2.13.0", torch.__version__
assert sys.prefix != sys.base_prefix, "not running inside the venv"
from transformers import MixtralForCausalLM  # noqa: F401  (fails on a broken dependency set)
print(f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
      f"huggingface_hub {huggingface_hub.__version__}, torch {torch.__version__}")
PY
}

start=$(date +%s)
if [[ -x "$VENV/bin/python" && "${FORCE:-0}" != 1 ]] && versions=$(check 2>/dev/null); then
    echo "$VENV is ready: $versions"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    "$PYTHON" -m venv --system-site-packages "$VENV"
fi
# pip installs into the venv only; a system package at a conflicting version is shadowed, not uninstalled.
# pip then lists system packages (gradio, datasets, mergekit) whose pins the venv's view breaks: harmless,
# the venv is only used to load models with transformers 4.
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" "${SPEC[@]}"
echo "$VENV is ready: $(check)"
echo "Set up in $(( $(date +%s) - start )) s."
