import json
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from studio.build.destination import mount_point
from studio.build.gates import GateOptions, compute_gates
from studio.build.merge import CancelToken, MergeOptions, merge
from studio.config import load_config
from studio.errors import Cancelled, StudioError

from conftest import moe_yaml, plan_of
from helpers import QUIET, config_of, output_tensors, source_tensors


@pytest.fixture(scope="module")
def merged(mistral, tmp_path_factory):
    base, experts = mistral
    config = config_of(moe_yaml(base, experts))
    out = tmp_path_factory.mktemp("merged") / "moe"
    result = merge(config, out, MergeOptions(out_shard_size=150_000), **QUIET)
    return config, out, result


def test_every_expert_tensor_is_its_source_mlp_bit_for_bit(mistral, merged):
    base, experts = mistral
    _, out, _ = merged
    written = output_tensors(out)
    base_tensors = source_tensors(base)
    for j, expert in enumerate(experts):
        dense = source_tensors(expert)
        for layer in range(2):
            prefix = f"model.layers.{layer}.block_sparse_moe.experts.{j}"
            for short, role in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                assert torch.equal(written[f"{prefix}.{short}.weight"], dense[f"model.layers.{layer}.mlp.{role}.weight"])
    for name, tensor in base_tensors.items():
        if ".mlp." not in name:
            assert torch.equal(written[name], tensor), name
    moe_names = {n for n in written if "block_sparse_moe" in n}
    assert len(moe_names) == 2 * (4 * 3 + 1)
    assert set(written) == moe_names | {n for n in base_tensors if ".mlp." not in n}


def test_routers_are_the_hidden_gates(mistral, merged):
    config, out, _ = merged
    gates = compute_gates(plan_of(config), GateOptions(), log=lambda m: None)
    written = output_tensors(out)
    for layer in range(2):
        router = written[f"model.layers.{layer}.block_sparse_moe.gate.weight"]
        assert router.dtype == torch.bfloat16 and router.shape == (4, 64)
        assert torch.equal(router, gates[layer].to(torch.bfloat16))


def test_shard_index_is_complete_and_shards_respect_the_limit(merged):
    _, out, _ = merged
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("*.safetensors"))
    assert len(shards) > 1
    assert {p.name for p in shards} == set(index["weight_map"].values())
    written = output_tensors(out)
    assert set(index["weight_map"]) == set(written)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    for path in shards:
        with safe_open(path, "pt") as f:
            keys = list(f.keys())
            size = sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in keys)
        assert size <= 150_000 or len(keys) == 1
        assert all(index["weight_map"][k] == path.name for k in keys)


def test_output_loads_generates_and_holds_the_sources(mistral, merged):
    base, experts = mistral
    _, out, _ = merged
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.num_local_experts == 4 and model.config.num_experts_per_tok == 2
    dense = source_tensors(experts[2])
    fused = model.model.layers[1].mlp.experts
    gate_up = torch.cat([dense["model.layers.1.mlp.gate_proj.weight"], dense["model.layers.1.mlp.up_proj.weight"]])
    assert torch.equal(fused.gate_up_proj[2], gate_up)
    assert torch.equal(fused.down_proj[2], dense["model.layers.1.mlp.down_proj.weight"])

    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer("def add(a, b):", return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert generated.shape[1] == inputs["input_ids"].shape[1] + 6


def test_side_files_tokenizer_card_and_config(mistral, merged):
    base, _ = mistral
    config, out, result = merged
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert load_config(out / "mergekit_moe_config.yml") == config
    saved = json.loads((out / "config.json").read_text())
    assert saved["architectures"] == ["MixtralForCausalLM"] and saved["model_type"] == "mixtral"
    assert saved["torch_dtype"] == "bfloat16" and saved["tie_word_embeddings"] is False
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "tags:" in card and "| 3 |" in card and "12 + 7 =" in card
    assert "```yaml" in card and "AutoModelForCausalLM" in card
    assert "The routers are not trained: they come from the prompts above." in card  # gate_mode: hidden
    assert sorted(result.files) == sorted(p.name for p in out.iterdir())
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]


def test_tied_llama_stays_tied_and_dtype_is_applied(llama_tied, tmp_path):
    base, experts = llama_tied
    config = config_of(moe_yaml(base, experts, gate_mode="cheap_embed", dtype="float16"))
    out = tmp_path / "moe"
    merge(config, out, **QUIET)
    written = output_tensors(out)
    assert "lm_head.weight" not in written
    assert all(t.dtype == torch.float16 for t in written.values())
    source = source_tensors(experts[1])
    assert torch.equal(written["model.layers.2.block_sparse_moe.experts.1.w2.weight"],
                       source["model.layers.2.mlp.down_proj.weight"].half())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_residual_scale_and_seeded_noise(mistral, tmp_path):
    base, experts = mistral
    data = moe_yaml(base, experts, dtype="float32")
    data["experts"][1]["residual_scale"] = 0.25
    data["experts"][3]["noise_scale"] = 0.01
    config = config_of(data)
    outs = [tmp_path / name for name in ("a", "b", "c")]
    for out, seed in zip(outs, (5, 5, 6)):
        merge(config, out, MergeOptions(random_seed=seed), **QUIET)
    a, b, c = (output_tensors(o) for o in outs)
    dense1, dense3 = source_tensors(experts[1]), source_tensors(experts[3])
    w2 = "model.layers.0.block_sparse_moe.experts.1.w2.weight"
    assert torch.equal(a[w2], dense1["model.layers.0.mlp.down_proj.weight"].float() * 0.25)
    assert torch.equal(a["model.layers.0.block_sparse_moe.experts.1.w1.weight"],
                       dense1["model.layers.0.mlp.gate_proj.weight"].float())
    noisy = "model.layers.1.block_sparse_moe.experts.3.w3.weight"
    delta = a[noisy] - dense3["model.layers.1.mlp.up_proj.weight"].float()
    assert 0.008 < delta.std() < 0.012 and abs(delta.mean()) < 0.002
    assert torch.equal(a[noisy], b[noisy]) and not torch.equal(a[noisy], c[noisy])
    other = a["model.layers.1.block_sparse_moe.experts.3.w1.weight"] - dense3["model.layers.1.mlp.gate_proj.weight"]
    assert not torch.equal(delta[: other.shape[0], : other.shape[1]], other)


def test_mismatched_expert_is_refused_before_writing(mistral, tmp_path, tokenizer):
    from studio.build.synthetic import make_family

    base, experts = mistral
    _, wide = make_family(tmp_path / "wide", 1, "mistral", intermediate=96, tokenizer=tokenizer)
    config = config_of(moe_yaml(base, [experts[0], wide[0]]))
    with pytest.raises(StudioError) as info:
        merge(config, tmp_path / "out", **QUIET)
    assert f"experts[1] ({wide[0]}): intermediate_size is 96, but the base ({base}) has 128" in str(info.value)
    assert not (tmp_path / "out").exists()

    # Same config.json, different tensor: found from the checkpoint header.
    liar = tmp_path / "liar"
    shutil.copytree(wide[0], liar)
    (liar / "config.json").write_text((experts[0] / "config.json").read_text())
    config = config_of(moe_yaml(base, [experts[0], liar]))
    with pytest.raises(StudioError, match=r"experts\[1\] .*model.layers.0.mlp.gate_proj.weight has shape \[96, 64\], "
                                          r"but the base .* has \[128, 64\]"):
        merge(config, tmp_path / "out", **QUIET)


def test_family_mismatch_is_named(mistral, llama_tied):
    config = config_of(moe_yaml(mistral[0], [mistral[1][0], llama_tied[1][0]]))
    with pytest.raises(StudioError, match=r"experts\[1\] .*: model family is llama, but the base .* is mistral"):
        merge(config, "/tmp/never-written", **QUIET)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("how", ["cancel", "ctrl-c", "error"])
def test_interrupted_merge_leaves_nothing(mistral, tmp_path, how):
    base, experts = mistral
    config = config_of(moe_yaml(base, experts))
    token = CancelToken()

    def progress(p):
        if p.stage == "write" and p.done > p.total // 2:
            if how == "cancel":
                token.cancel()
            elif how == "ctrl-c":
                raise KeyboardInterrupt
            else:
                raise OSError(28, "No space left on device")

    expected = {"cancel": Cancelled, "ctrl-c": KeyboardInterrupt, "error": StudioError}[how]
    with pytest.raises(expected) as info:
        merge(config, tmp_path / "out", MergeOptions(out_shard_size=100_000), progress=progress, cancel=token, **QUIET)
    if how == "error":
        assert f"failed: the disk is full on {mount_point(tmp_path)}." in str(info.value)
        assert "needs 542,336 bytes (0.00 GB) of weights plus 64 MiB" in str(info.value)
    assert leftovers(tmp_path) == []


def test_existing_output_is_refused_then_replaced_with_overwrite(mistral, tmp_path):
    base, experts = mistral
    config = config_of(moe_yaml(base, experts, gate_mode="random"))
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(StudioError, match="already exists and is not empty.*--overwrite"):
        merge(config, out, **QUIET)
    with pytest.raises(StudioError, match=r"is not an earlier merge \(it has no config.json, mergekit_moe_config.yml, "
                                          r"weights\), so --overwrite will not replace it"):
        merge(config, out, MergeOptions(overwrite=True), **QUIET)
    assert leftovers(out) == ["precious.txt"]

    (out / "precious.txt").unlink()
    first = merge(config, out, MergeOptions(random_seed=1), **QUIET)
    merge(config, out, MergeOptions(overwrite=True, random_seed=2), **QUIET)
    assert leftovers(out) == sorted(first.files) and (out / "model.safetensors").exists()
    assert leftovers(tmp_path) == ["out"]


def test_output_may_not_replace_a_source_model(mistral, tmp_path):
    base, experts = mistral
    config = config_of(moe_yaml(base, experts, gate_mode="random"))
    with pytest.raises(StudioError, match="is not an earlier merge"):
        merge(config, experts[1], MergeOptions(overwrite=True), **QUIET)
    with pytest.raises(StudioError, match=r"lies inside the model folder .*base, which the merge reads"):
        merge(config, base / "moe", **QUIET)
    assert (experts[1] / "model.safetensors").exists() and not (base / "moe").exists()


def test_disk_space_is_checked_first(mistral, tmp_path, monkeypatch):
    import studio.build.merge

    base, experts = mistral
    config = config_of(moe_yaml(base, experts, gate_mode="random"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(studio.build.merge.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(StudioError, match=rf"Not enough disk space on {re.escape(str(mount_point(tmp_path)))} for .*out: the merge writes 542,336 bytes of "
                                          r"weights \(0.00 GB\) and needs them plus 64 MiB for the other files free, "
                                          r"67,651,200 bytes in all, but only 1,000 bytes \(0.00 GB\) are free"):
        merge(config, tmp_path / "out", **QUIET)
    assert leftovers(tmp_path) == []


def test_gate_failure_stops_the_merge_and_leaves_nothing(mistral, tmp_path):
    base, experts = mistral
    bare = tmp_path / "bare-base"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(base / name, bare)
    config = config_of(moe_yaml(bare, experts))
    with pytest.raises(StudioError, match="its tokenizer cannot be loaded"):
        merge(config, tmp_path / "out", MergeOptions(copy_tokenizer=False), **QUIET)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare-base"]


def test_no_output_fits_a_llama_with_attention_biases(tmp_path, tokenizer):
    from studio.build.synthetic import make_family

    base, experts = make_family(tmp_path / "biased", 2, "llama", tokenizer=tokenizer, attention_bias=True)
    with pytest.raises(StudioError, match=r"No output architecture fits these models:\n  - Mixtral: has no "
                                          r"attention or MLP biases, and the base uses them"):
        merge(config_of(moe_yaml(base, experts)), tmp_path / "out", **QUIET)


def test_plan_estimates_match_the_written_output(merged):
    _, out, result = merged
    estimates = result.plan.memory_estimates()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert estimates["output"] == index["metadata"]["total_size"]
    assert estimates["bf16"] == 2 * result.plan.parameters
    # hidden gates on a streamable base: one float32 decoder layer (attention 4 x 64 x 64 with half-size k and v,
    # MLP 3 x 64 x 128, two norms), plus two copies of the largest output tensor
    layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64
    largest_output_tensor = max(job.nbytes for job in result.plan.jobs)
    assert estimates["merge_peak"] == layer * 4 + 2 * largest_output_tensor
