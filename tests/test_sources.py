import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from studio.errors import StudioError
from studio.sources import ModelRef, open_model


def test_model_refs_parse_hub_ids_revisions_and_paths(tmp_path):
    ref = ModelRef.parse("org/name@v1.0")
    assert (ref.location, ref.revision, ref.is_local) == ("org/name", "v1.0", False)
    assert not ModelRef.parse("gpt2").is_local
    assert ModelRef.parse(str(tmp_path)).is_local
    assert ModelRef.parse("./models/mine").is_local
    with pytest.raises(StudioError, match="LoRA"):
        ModelRef.parse("org/name+org/lora")


def test_sharded_and_single_checkpoints_read_exactly(mistral, llama_tied):
    for folder in (mistral[0], llama_tied[0]):
        files = sorted(folder.glob("*.safetensors"))
        expected = {k: v for f in files for k, v in load_file(f).items()}
        source = open_model(str(folder))
        assert set(source.tensors) == set(expected)
        for name, tensor in expected.items():
            read = source.read(name)
            assert read.dtype == tensor.dtype and torch.equal(read, tensor)
    assert len(list(llama_tied[0].glob("*.safetensors"))) > 1


def test_bin_checkpoints_are_read_when_there_is_no_safetensors(mistral, tmp_path):
    folder = tmp_path / "bin"
    folder.mkdir()
    shutil.copy(mistral[0] / "config.json", folder)
    state = load_file(mistral[0] / "model.safetensors")
    torch.save(state, folder / "pytorch_model.bin")
    source = open_model(str(folder))
    assert all(info.path.name == "pytorch_model.bin" for info in source.tensors.values())
    for name, tensor in state.items():
        assert torch.equal(source.read(name), tensor)


def copy_model(folder, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    return target


def test_corrupt_header_truncated_file_and_missing_tensor(mistral, tmp_path):
    folder = copy_model(mistral[0], tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()

    weights.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(StudioError, match="corrupt safetensors header"):
        open_model(str(folder))

    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(StudioError, match="truncated or corrupt"):
        open_model(str(folder))

    weights.write_bytes(data)
    with pytest.raises(StudioError, match="tensor 'model.layers.9.mlp.up_proj.weight' is missing"):
        open_model(str(folder)).read("model.layers.9.mlp.up_proj.weight")


def test_missing_folder_config_and_weights(tmp_path, mistral):
    with pytest.raises(StudioError, match="does not exist"):
        open_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(StudioError, match="has no config.json"):
        open_model(str(tmp_path / "empty"))
    (tmp_path / "empty" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    with pytest.raises(StudioError, match="holds no model weights"):
        open_model(str(tmp_path / "empty"))
    folder = copy_model(mistral[0], tmp_path)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "model-9.safetensors"}}))
    with pytest.raises(StudioError, match="the shard index lists model-9.safetensors"):
        open_model(str(folder))


def test_unreachable_hub_model_gives_a_clear_error():
    # Without network this is a connection error or a file not in the cache (after huggingface_hub's retries,
    # about 20 s); with network, a repository that does not exist.
    with pytest.raises(StudioError, match=r"^Model 'example-org/no-such-model@main' (could not be fetched "
                                          r"\(\w+: .*\); check the network|was not found on the Hub|"
                                          r"is not in the local Hub cache)"):
        open_model("example-org/no-such-model@main", fetch_weights=False)


def test_a_model_in_the_hub_cache_opens_offline(mistral, tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1: a model downloaded earlier opens from the cache (even for `plan`, which reads the Hub's
    metadata when online); one not in the cache is named as such."""
    import huggingface_hub.constants

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--me--tiny"
    shutil.copytree(mistral[0], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    local = open_model(str(mistral[0]))
    for fetch_weights in (True, False):
        cached = open_model("me/tiny", fetch_weights=fetch_weights)
        assert cached.folder == repo / "snapshots" / commit and cached.config == local.config
        assert torch.equal(cached.read("model.embed_tokens.weight"), local.read("model.embed_tokens.weight"))
    with pytest.raises(StudioError, match=r"^Model 'me/other' is not in the local Hub cache and could not be "
                                          r"downloaded \(Hub access is off, HF_HUB_OFFLINE=1"):
        open_model("me/other", fetch_weights=False)
