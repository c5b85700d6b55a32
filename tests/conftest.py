"""Small real models built once per test session, the fixtures several test modules share, and a helper that
writes configs for them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from studio.build.synthetic import make_family, make_tokenizer

from helpers import FAMILIES, ROOT, random_moe

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
    return make_family(tmp_path_factory.mktemp("llama"), 2, "llama", dtype=torch.float32,
                       max_shard_size="60KB", tie=True, layers=3, seed=1, tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tiny_moes(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Random Mixtral, Qwen2-MoE and Qwen3-MoE models (helpers.FAMILIES), bf16."""
    root = tmp_path_factory.mktemp("tiny-moes")
    return {family: random_moe(root / family, family, tokenizer=tokenizer) for family in FAMILIES}


@pytest.fixture(scope="session")
def zoo_moe(tmp_path_factory) -> Path:
    """The bundled zoo (trained weights) merged into a Mixtral by the example config."""
    from studio.build.merge import merge
    from studio.config import load_config

    out = tmp_path_factory.mktemp("zoo") / "zoo-4x"
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # the example config's paths are relative to the project folder
        merge(load_config(ROOT / "assets" / "examples" / "zoo-fragments.yml"), out, log=lambda m: None)
    return out


@pytest.fixture(scope="module")
def zoo_bf16(zoo_moe):
    from studio.inspect.chat import load_chat_model

    return load_chat_model(zoo_moe, "bf16", "cpu")


@pytest.fixture(scope="module")
def single_thread():
    """Tiny models gain nothing from a second thread, and on a shared 2-core machine torch's spinning threads
    slow generation many times over whenever another process is busy. Modules that generate request it with
    `pytestmark = pytest.mark.usefixtures("single_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def monkeypatch_module():
    """A monkeypatch whose changes (the working folder, above all) last for the whole module."""
    with pytest.MonkeyPatch.context() as patch:
        yield patch


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
    from studio.build.plan import make_plan
    from studio.sources import open_models

    return make_plan(config, open_models(config.model_refs()))
