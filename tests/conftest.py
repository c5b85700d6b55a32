"""Small real models built once per test session, and a helper that writes configs for them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from studio.synthetic import make_family, make_tokenizer

PROMPTS = [["def add(a, b):", "import os"], ["12 + 7 =", "3 * 4 ="], ["Once upon a time", "The king walked"],
           ["Hello, how are you?", "Question: what is"]]


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def mistral(tmp_path_factory, tokenizer) -> tuple[Path, list[Path]]:
    """A bf16 Mistral base and four fine-tunes, one safetensors file each."""
    return make_family(tmp_path_factory.mktemp("mistral"), 4, "mistral", tokenizer=tokenizer)


@pytest.fixture(scope="session")
def llama_tied(tmp_path_factory, tokenizer) -> tuple[Path, list[Path]]:
    """A float32 Llama with tied embeddings and two fine-tunes, each split over several shards."""
    return make_family(tmp_path_factory.mktemp("llama"), 2, "llama", dtype=__import__("torch").float32,
                       max_shard_size="60KB", tie=True, layers=3, seed=1, tokenizer=tokenizer)


def moe_yaml(base: Path, experts: list[Path], **top) -> dict:
    """A config dict: one expert per model, each with its own prompts."""
    data = {"base_model": str(base), "gate_mode": "hidden", "dtype": "bfloat16"}
    data.update(top)
    data["experts"] = [{"source_model": str(e), "positive_prompts": PROMPTS[i % len(PROMPTS)]}
                       for i, e in enumerate(experts)]
    return data


@pytest.fixture
def write_config(tmp_path):
    def write(data: dict, name: str = "config.yml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    return write


def plan_of(config):
    """The merge plan of a config, its models opened."""
    from studio.plan import make_plan
    from studio.sources import open_models

    return make_plan(config, open_models(config.model_refs()))
