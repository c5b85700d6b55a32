"""Plain helpers and constants that several test modules share: tiny random MoEs, reading tensors back, router
probabilities, the transformers 4.x interpreter. Fixtures live in conftest.py; test modules import from here, never
from each other."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors import safe_open
from torch.nn.utils import parametrize
from transformers import AutoModelForCausalLM

from studio.build.synthetic import make_tokenizer, save_tokenizer
from studio.config import load_yaml
from studio.inspect.routing import RouterCapture
from studio.sources import open_model
from studio.trace import RouterTrace

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda message: None}
TEXT = ("Once upon a time, there was a little fox named Max. He lived in a quiet village.\n"
        "def add(a, b):\n    return a + b\n12 + 7 = 19")

COMMON = {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
          "vocab_size": 384, "max_position_embeddings": 256, "num_experts_per_tok": 2, "bos_token_id": 1,
          "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False}
# family -> (config class, its MoE fields, decoder layers with a router). Experts hold most of the weights,
# as in real MoEs. Qwen2-MoE's layer 1 is dense (mlp_only_layers).
FAMILIES = {
    "mixtral": ("MixtralConfig", {"num_local_experts": 4, "intermediate_size": 256}, [0, 1, 2]),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 4, "moe_intermediate_size": 384, "intermediate_size": 128,
                                     "shared_expert_intermediate_size": 128, "mlp_only_layers": [1]}, [0, 2]),
    "qwen3_moe": ("Qwen3MoeConfig", {"num_experts": 8, "moe_intermediate_size": 128, "intermediate_size": 128,
                                     "head_dim": 16}, [0, 1, 2]),
}


def random_moe(folder: Path, family: str, seed: int = 0, tokenizer=None, dtype=torch.bfloat16, **shape) -> Path:
    """A randomly initialised MoE of `family`, saved with the synthetic tokenizer."""
    class_name, moe_fields, _ = FAMILIES[family]
    config = getattr(transformers, class_name)(**{**COMMON, **moe_fields, **shape})
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).to(dtype).save_pretrained(folder)
    save_tokenizer(tokenizer or make_tokenizer(), folder)
    if "num_experts" in moe_fields:  # 5.x saves it as num_local_experts; Hub Qwen configs (and 4.x) say num_experts
        saved = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**saved, "num_experts": config.num_experts}))
    return folder


def config_of(data: dict):
    return load_yaml(yaml.safe_dump(data))


def output_tensors(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def source_tensors(folder) -> dict[str, torch.Tensor]:
    source = open_model(str(folder))
    return {name: source.read(name) for name in source.tensors}


def plain_forward_probabilities(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
    return torch.stack([l.float().softmax(dim=-1) for l in out.router_logits if l is not None])


def captured(model, ids: list[int], labels: list[str]) -> RouterTrace:
    with torch.no_grad(), RouterCapture(model) as capture:
        model(input_ids=torch.tensor([ids]))
    return capture.trace(ids, [str(i) for i in ids], 5, labels)


def expert_modules(model) -> list:
    return [m for m in model.modules() if parametrize.is_parametrized(m)]


TF4_PYTHON = ROOT / ".venv-tf4" / "bin" / "python"
SETUP_HINT = "run `bash .ci/transformers4.sh` to create .venv-tf4 (or set STUDIO_SKIP_TF4=1 to skip these tests)"


def tf4_python() -> Path:
    """The venv's interpreter, checked (and made or rebuilt when missing or broken) by .ci/transformers4.sh.

    The script runs once per session, also when the venv exists: a half-built or broken venv must be rebuilt,
    not reused. With STUDIO_SKIP_TF4=1 and no venv, the tests skip instead; a failed setup fails them with the
    script's own explanation.
    """
    global _TF4_READY
    if _TF4_READY is None:
        if os.environ.get("STUDIO_SKIP_TF4") == "1" and not TF4_PYTHON.exists():
            pytest.skip(f"STUDIO_SKIP_TF4=1 and {TF4_PYTHON} does not exist")
        setup = subprocess.run(["bash", str(ROOT / ".ci" / "transformers4.sh")], capture_output=True, text=True,
                               timeout=900)
        _TF4_READY = (setup.returncode == 0 and TF4_PYTHON.exists(), setup.stdout[-3000:] + setup.stderr[-3000:])
    ready, output = _TF4_READY
    if not ready:
        pytest.fail(f"could not create {TF4_PYTHON}: {SETUP_HINT}\n{output}", pytrace=False)
    return TF4_PYTHON


_TF4_READY: tuple[bool, str] | None = None


ALPHABETS = ["0123456789", "abcdefghij", "KLMNOPQRST", "+-*/=<>()[]"]


def domain_text(alphabet: str, seed: int, words: int = 600) -> str:
    """Words drawn from one alphabet only: which expert a token belongs to is known by construction."""
    rng = random.Random(seed)
    return " ".join("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 6))) for _ in range(words))
