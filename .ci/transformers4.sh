#!/usr/bin/env bash
# A virtualenv with transformers 4.57.x, for tests/test_transformers4.py (our output must load in 4.x and 5.x).
#
# The venv (.venv-tf4 at the repo root) is isolated: it does not see any site-packages but its own, and gets its
# own torch (2.13.0, the CPU build, pinned by a constraints file so pip can never pull a CUDA build; pip's cache
# makes the install quick). A venv that sees another interpreter's packages passes or fails depending on what
# that interpreter happens to have: in a fresh virtualenv, the base interpreter has no torch.
#
# Idempotent: a second run finds the venv ready and returns at once. A venv that fails the check (half-built,
# broken, or made by an older version of this script) is deleted and built again. A failed build prints why,
# removes what it made and exits 1. FORCE=1 rebuilds anyway.
# PYTHON picks the interpreter the venv is made from (default: python3; a venv's python3 makes a venv from its
# base interpreter, without the packages of either).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv-tf4"
CONSTRAINTS="$ROOT/.ci/constraints-tf4.txt"
PYTHON="${PYTHON:-python3}"
# transformers 4.57 and what it needs at other versions than the main environment, then what studio.inspect.chat imports
# (tests/test_chat.py runs the studio's own 4-bit chat under transformers 4.x).
SPEC=("torch==2.13.0" "transformers>=4.57,<4.58" "tokenizers<=0.23.0" "huggingface_hub<1.0" "safetensors>=0.4.3"
      "accelerate>=1.0" "bitsandbytes>=0.45" "pydantic>=2.6" "pyyaml>=6.0" "tqdm>=4.66" "psutil>=5.9")

check() {
    "$VENV/bin/python" - <<'PY'
import sys
from pathlib import Path

import torch, transformers, tokenizers, huggingface_hub
import accelerate, bitsandbytes, pydantic, yaml, tqdm, psutil  # noqa: F401  (what studio.inspect.chat imports)
assert transformers.__version__.startswith("4.57."), f"transformers is {transformers.__version__}, not 4.57.x"
assert torch.__version__.split("+")[0] == "2.13.0", f"torch is {torch.__version__}, not 2.13.0"
assert sys.prefix != sys.base_prefix, "not running inside the venv"
for module in (torch, transformers):
    assert Path(module.__file__).resolve().is_relative_to(Path(sys.prefix).resolve()), \
        f"{module.__name__} comes from {module.__file__}, outside the venv"
from transformers import MixtralForCausalLM  # noqa: F401  (fails on a broken dependency set)
print(f"transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, "
      f"huggingface_hub {huggingface_hub.__version__}, torch {torch.__version__}")
PY
}

start=$(date +%s)
if [[ -x "$VENV/bin/python" && "${FORCE:-0}" != 1 ]]; then
    if versions=$(check 2>/dev/null); then
        echo "$VENV is ready: $versions"
        exit 0
    fi
    echo "$VENV fails its check; building it again." >&2
fi

rm -rf "$VENV"
fail() {
    echo "Could not build $VENV: $1" >&2
    rm -rf "$VENV"
    exit 1
}
"$PYTHON" -m venv "$VENV" || fail "\`$PYTHON -m venv\` failed (is the venv module installed?)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -c "$CONSTRAINTS" "${SPEC[@]}" \
    || fail "pip could not install ${SPEC[*]} (output above)"
if ! versions=$(check); then
    fail "the installed packages fail the check (output above)"
fi
echo "$VENV is ready: $versions"
echo "Set up in $(( $(date +%s) - start )) s."
