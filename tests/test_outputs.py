"""Every output architecture, merged from small random models of each input family: expert tensors are their
source MLPs, the output loads with no missing or unexpected tensors, generates, reports router logits that the
studio's router capture sees exactly, and chats with routing recorded. Where the construction makes the MoE
equal to its dense base (every expert is the base's MLP), its logits are checked against the base's. The Qwen
outputs also load in transformers 4.x (.venv-tf4, see test_transformers4.py) with the same logits.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from studio.app.cli import main
from studio.build.gates import GateOptions, compute_gates
from studio.build.merge import MergeOptions, merge
from studio.build.synthetic import make_family
from studio.errors import StudioError
from studio.families import family_of
from studio.inspect.chat import ChatSettings, load_chat_model
from studio.sources import open_model

from conftest import moe_yaml
from helpers import (QUIET, ROOT, captured, config_of, output_tensors, plain_forward_probabilities, source_tensors,
                     tf4_python)

pytestmark = pytest.mark.usefixtures("single_thread")
TEXT_IDS = [1, 17, 42, 99, 200, 7, 300, 5, 64, 11]


@pytest.fixture(scope="module")
def families(tmp_path_factory, tokenizer) -> dict:
    """float32 dense families (a base and two fine-tunes), one per input family the outputs accept."""
    root = tmp_path_factory.mktemp("families")
    shapes = {"qwen2": {}, "qwen3": {"head_dim": 32}, "llama": {"head_dim": 32, "tie": True},
              "mistral": {"sliding_window": 64}, "phi": {}}
    return {name: make_family(root / name, 2, name, dtype=torch.float32, tokenizer=tokenizer, seed=3, **shape)
            for name, shape in shapes.items()}


def merged(family: tuple, tmp_path, shared: dict | None = None, each_expert: dict | None = None, **top):
    base, experts = family
    data = moe_yaml(base, experts, dtype="float32", **top)
    for expert in data["experts"]:
        expert.update(each_expert or {})
    if shared is not None:
        data["shared_experts"] = [shared]
    out = tmp_path / "moe"
    options = MergeOptions(random_seed=0, allow_identical_experts=True)
    return out, merge(config_of(data), out, options, **QUIET)


def same_as_base(family: tuple, tmp_path, shared: dict | None = None, each_expert: dict | None = None, **top):
    """A merge whose routed experts are all the base model (routers from prompts, so a shared expert without
    prompts gets no gate)."""
    base, _ = family
    return merged((base, [base, base]), tmp_path, shared, each_expert, gate_mode="cheap_embed", **top)


def load(out, **kwargs):
    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True, **kwargs)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def dense_logits(folder) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([TEXT_IDS])).logits


def check_runs(model, experts: int) -> None:
    """Generates, reports router logits for every layer, and the router hooks see exactly those."""
    out = model.generate(torch.tensor([TEXT_IDS[:4]]), max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert out.shape == (1, 9)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([TEXT_IDS]), output_router_logits=True).router_logits
    assert len(logits) == model.config.num_hidden_layers
    assert all(layer.shape == (len(TEXT_IDS), experts) for layer in logits)
    trace = captured(model, TEXT_IDS, [f"e{i}" for i in range(experts)])
    assert torch.equal(trace.probabilities, plain_forward_probabilities(model, TEXT_IDS))


def check_chat(out, experts: int, precision: str = "fp32", **kwargs) -> None:
    chat = load_chat_model(out, precision, "cpu", **kwargs)
    reply = chat.reply([{"role": "user", "content": "Once upon a time"}],
                       ChatSettings(temperature=0, max_new_tokens=6))
    trace = reply.trace
    assert trace.probabilities.shape == (len(trace.layers), len(trace.token_ids), experts)
    torch.testing.assert_close(trace.probabilities, plain_forward_probabilities(chat.model, trace.token_ids),
                               atol=1e-5, rtol=1e-4)


def check_experts(out, family: tuple, names) -> None:
    """Each routed expert's tensors are its source MLP's; `names(layer, j)` maps dense role -> output name."""
    base, experts = family
    written = output_tensors(out)
    dense_family = family_of(open_model(str(base)).config["model_type"])
    for j, expert in enumerate(experts):
        dense = source_tensors(expert)
        for layer in range(2):
            for role, name in names(layer, j).items():
                assert torch.equal(written[name], dense[dense_family.mlp_tensors(layer)[role]]), name


def swiglu(layer: int, j) -> dict[str, str]:
    return {r: f"model.layers.{layer}.mlp.experts.{j}.{r}_proj.weight" for r in ("gate", "up", "down")}


def test_qwen2_with_a_prompted_shared_expert(families, tmp_path):
    base, experts = families["qwen2"]
    shared = {"source_model": str(experts[0]), "positive_prompts": ["Hello, how are you?"], "residual_scale": 0.5}
    out, result = merged(families["qwen2"], tmp_path, shared)
    assert result.plan.output.name == "Qwen MoE"
    card = (out / "README.md").read_text()
    assert f"| shared | {experts[0]} | Hello, how are you? | - |" in card and "trust_remote_code" not in card
    check_experts(out, families["qwen2"], swiglu)
    written, dense = output_tensors(out), source_tensors(experts[0])
    for role in ("gate", "up"):
        assert torch.equal(written[f"model.layers.1.mlp.shared_expert.{role}_proj.weight"],
                           dense[f"model.layers.1.mlp.{role}_proj.weight"])
    assert torch.equal(written["model.layers.1.mlp.shared_expert.down_proj.weight"],
                       dense["model.layers.1.mlp.down_proj.weight"] * 0.5)
    gates = compute_gates(result.plan, GateOptions(), log=print)
    assert gates.shape[1] == 3  # two routed experts, then the shared one
    for layer in range(2):
        assert torch.equal(written[f"model.layers.{layer}.mlp.shared_expert_gate.weight"], gates[layer, 2:])
        assert torch.equal(written[f"model.layers.{layer}.mlp.gate.weight"], gates[layer, :2])
    model = load(out)
    assert type(model).__name__ == "Qwen2MoeForCausalLM" and model.config.shared_expert_intermediate_size == 128
    check_runs(model, 2)
    check_chat(out, 2)


def test_qwen2_without_a_shared_expert_equals_the_dense_base(families, tmp_path):
    base, _ = families["qwen2"]
    out, result = same_as_base(families["qwen2"], tmp_path)
    assert result.plan.output.name == "Qwen MoE"
    written = output_tensors(out)
    for role, shape in (("gate", (64, 64)), ("up", (64, 64)), ("down", (64, 64))):  # not width 0 (llama.cpp)
        tensor = written[f"model.layers.0.mlp.shared_expert.{role}_proj.weight"]
        assert tensor.shape == shape and not tensor.any()
    # an idle gate, not 0: llama.cpp's sigmoid, silu(x)/x, is NaN at 0
    assert torch.equal(written["model.layers.0.mlp.shared_expert_gate.weight"], torch.full((1, 64), 2.0 ** -48))
    model = load(out)
    assert model.config.shared_expert_intermediate_size == 64 and model.config.norm_topk_prob is False
    torch.testing.assert_close(model(input_ids=torch.tensor([TEXT_IDS])).logits, dense_logits(base),
                               atol=1e-5, rtol=1e-5)
    check_runs(model, 2)
    check_chat(out, 2, "4bit")


def test_qwen2_idle_gate_is_the_smallest_float16_in_a_float16_output(families, tmp_path):
    """float16 cannot hold 2**-48; its idle gate is 2**-24, still far from the 0 llama.cpp reads as NaN."""
    base, experts = families["qwen2"]
    merge(config_of(moe_yaml(base, experts, dtype="float16")), tmp_path / "moe", MergeOptions(random_seed=0), **QUIET)
    gate = output_tensors(tmp_path / "moe")["model.layers.1.mlp.shared_expert_gate.weight"]
    assert gate.dtype == torch.float16 and torch.equal(gate, torch.full((1, 64), 2.0 ** -24, dtype=torch.float16))


def test_llama_into_qwen2_gets_zero_biases_its_head_and_an_ungated_shared_expert(families, tmp_path):
    """Half of the base MLP from the routed experts and half from an unprompted shared expert: the dense base."""
    base, _ = families["llama"]
    shared = {"source_model": str(base), "residual_scale": 0.5}
    out, _ = same_as_base(families["llama"], tmp_path, shared, {"residual_scale": 0.5}, architecture="qwen")
    written, dense = output_tensors(out), source_tensors(base)
    assert torch.equal(written["lm_head.weight"], dense["model.embed_tokens.weight"])  # llama.cpp has no tied head
    # head_dim 32 with 4 query heads and 2 key/value heads (not hidden / heads = 16)
    assert written["model.layers.1.self_attn.q_proj.bias"].shape == (128,)
    assert written["model.layers.1.self_attn.k_proj.bias"].shape == (64,)
    assert not written["model.layers.1.self_attn.v_proj.bias"].any()
    assert torch.equal(written["model.layers.1.mlp.shared_expert_gate.weight"],  # sigmoid(idle gate) = 1/2 ...
                       torch.full((1, 64), 2.0 ** -48))
    assert torch.equal(written["model.layers.1.mlp.shared_expert.down_proj.weight"],  # ... made up for here
                       dense["model.layers.1.mlp.down_proj.weight"])
    model = load(out)
    assert not model.config.tie_word_embeddings
    torch.testing.assert_close(model(input_ids=torch.tensor([TEXT_IDS])).logits, dense_logits(base),
                               atol=1e-5, rtol=1e-5)
    check_runs(model, 2)


def test_qwen3_carries_its_norms_and_equals_the_dense_base(families, tmp_path):
    base, _ = families["qwen3"]
    out, result = same_as_base(families["qwen3"], tmp_path, architecture="QWEN")
    assert result.plan.output.name == "Qwen3 MoE"
    written, dense = output_tensors(out), source_tensors(base)
    for name in ("model.layers.1.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"):
        assert torch.equal(written[name], dense[name])
    model = load(out)
    assert type(model).__name__ == "Qwen3MoeForCausalLM" and model.config.head_dim == 32
    torch.testing.assert_close(model(input_ids=torch.tensor([TEXT_IDS])).logits, dense_logits(base),
                               atol=1e-5, rtol=1e-5)
    merged_out, _ = merged(families["qwen3"], tmp_path / "real")
    check_experts(merged_out, families["qwen3"], swiglu)
    check_runs(load(merged_out), 2)
    check_chat(merged_out, 2)


def test_mistral_with_a_prompted_shared_expert_becomes_qwen2_moe_with_its_window(families, tmp_path):
    _, experts = families["mistral"]
    shared = {"source_model": str(experts[1]), "positive_prompts": ["12 + 7 ="]}
    out, result = merged(families["mistral"], tmp_path, shared)
    assert result.plan.output.name == "Qwen MoE"
    model = load(out)
    assert model.config.sliding_window == 64 and set(model.config.layer_types) == {"sliding_attention"}
    check_runs(model, 2)


def test_architecture_prefix_chooses_and_misfits_are_explained(families, tmp_path):
    base, experts = families["qwen2"]
    data = moe_yaml(base, experts, architecture="mixtral")
    with pytest.raises(StudioError, match=r"No output architecture fits these models:\n  - Mixtral: needs llama or "
                                          r"mistral models, got qwen2$"):
        merge(config_of(data), tmp_path / "out", **QUIET)
    data = moe_yaml(base, experts, architecture="gemma")
    with pytest.raises(StudioError, match="matches no output; choose one of Mixtral, "):
        merge(config_of(data), tmp_path / "out", **QUIET)
    qwen3_base, qwen3_experts = families["qwen3"]
    data = moe_yaml(qwen3_base, qwen3_experts)
    data["shared_experts"] = [{"source_model": str(qwen3_experts[0])}]
    with pytest.raises(StudioError) as info:
        merge(config_of(data), tmp_path / "out", **QUIET)
    assert str(info.value) == (
        "No output architecture fits these models:\n"
        "  - Mixtral: needs llama or mistral models, got qwen3\n"
        "  - DeepSeek MoE: needs llama or mistral models, got qwen3\n"
        "  - Qwen MoE: needs qwen2, llama or mistral models, got qwen3\n"
        "  - Qwen3 MoE: has no shared expert, and the config has 1\n"
        "  - Phi MoE: needs phi models, got qwen3")
    data = moe_yaml(base, [experts[0], qwen3_experts[0]])
    with pytest.raises(StudioError, match=r"experts\[1\] .*: model family is qwen3, but the base .* is qwen2"):
        merge(config_of(data), tmp_path / "out", **QUIET)


def phi_names(layer: int, j: int) -> dict[str, str]:
    prefix = f"model.layers.{layer}.mlp.experts.{j}"
    return {"fc1": f"{prefix}.fc1.weight", "fc1_bias": f"{prefix}.fc1.bias", "fc2": f"{prefix}.fc2.weight",
            "fc2_bias": f"{prefix}.fc2.bias"}


def test_phi_becomes_a_phixtral_that_loads_offline_with_its_own_code(families, tmp_path, capsys):
    out, result = merged(families["phi"], tmp_path, each_expert={"residual_scale": 1.0})
    assert result.plan.output.name == "Phi MoE"
    assert {"configuration_phixtral.py", "modeling_phixtral.py", "sparse_moe.py"} <= set(result.files)
    assert 'device_map="auto", trust_remote_code=True)' in (out / "README.md").read_text()
    check_experts(out, families["phi"], phi_names)
    with pytest.raises(ValueError, match="trust_remote_code"):
        AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False)
    model = load(out, trust_remote_code=True)
    assert type(model).__name__ == "PhixtralForCausalLM"
    assert len(model.model.layers[1].mlp.experts) == 2
    check_runs(model, 2)
    check_training_loss(model)
    check_chat(out, 2, trust_remote_code=True)
    check_chat(out, 2, "4bit", trust_remote_code=True)
    with pytest.raises(StudioError, match="pass trust_remote_code"):
        load_chat_model(out, "fp32", "cpu")
    prompts = tmp_path / "prompts.yml"
    prompts.write_text(yaml.safe_dump({0: ["def add(a, b):"], 1: ["12 + 7 =", "3 * 4 ="]}))
    assert main(["eval-routing", str(out), str(prompts), "--trust-remote-code"]) == 0
    table = capsys.readouterr().out
    rows = [line.split() for line in table.splitlines() if line.startswith(str(families["phi"][1][1]))]
    assert table.startswith("Prompts whose tokens mostly reach") and rows[0][1] == "2"  # expert 1's two prompts


def test_phixtral_of_the_base_mlp_equals_phi_and_residual_scale_covers_the_bias(families, tmp_path):
    base, _ = families["phi"]
    out, _ = same_as_base(families["phi"], tmp_path / "same")
    model = load(out, trust_remote_code=True)
    torch.testing.assert_close(model(input_ids=torch.tensor([TEXT_IDS])).logits, dense_logits(base),
                               atol=1e-5, rtol=1e-5)
    halves, _ = same_as_base(families["phi"], tmp_path / "halves", each_expert={"residual_scale": 0.5})
    written, dense = output_tensors(halves), source_tensors(base)
    for name in ("fc2.weight", "fc2.bias"):
        assert torch.equal(written[f"model.layers.0.mlp.experts.1.{name}"], dense[f"model.layers.0.mlp.{name}"] * 0.5)
    assert torch.equal(written["model.layers.0.mlp.experts.1.fc1.bias"], dense["model.layers.0.mlp.fc1.bias"])


def check_training_loss(model) -> None:
    """The remote-code classes compute the loss with the routers' balancing term, as Mixtral does."""
    ids = torch.tensor([TEXT_IDS])
    out = model(input_ids=ids, labels=ids, output_router_logits=True)
    plain = model(input_ids=ids, labels=ids)
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, plain.loss + model.config.router_aux_loss_coef * out.aux_loss)


def test_mistral_with_an_unprompted_shared_expert_becomes_deepseek_moe(families, tmp_path):
    _, experts = families["mistral"]
    out, result = merged(families["mistral"], tmp_path, {"source_model": str(experts[1]), "residual_scale": 0.25})
    assert result.plan.output.name == "DeepSeek MoE"
    check_experts(out, families["mistral"], swiglu)
    written, dense = output_tensors(out), source_tensors(experts[1])
    assert torch.equal(written["model.layers.1.mlp.shared_experts.up_proj.weight"],
                       dense["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(written["model.layers.1.mlp.shared_experts.down_proj.weight"],
                       dense["model.layers.1.mlp.down_proj.weight"] * 0.25)
    model = load(out, trust_remote_code=True)
    assert type(model).__name__ == "DeepseekForCausalLM" and model.config.sliding_window == 64
    assert model.config.n_routed_experts == 2 and model.config.n_shared_experts == 1
    check_runs(model, 2)
    check_training_loss(model)
    check_chat(out, 2, trust_remote_code=True)
    check_chat(out, 2, "4bit", trust_remote_code=True)


def test_deepseek_of_halves_of_the_base_mlp_equals_the_tied_llama(families, tmp_path):
    base, _ = families["llama"]
    shared = {"source_model": str(base), "residual_scale": 0.5}
    out, _ = same_as_base(families["llama"], tmp_path, shared, {"residual_scale": 0.5})
    model = load(out, trust_remote_code=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    torch.testing.assert_close(model(input_ids=torch.tensor([TEXT_IDS])).logits, dense_logits(base),
                               atol=1e-5, rtol=1e-5)
    assert model.config.norm_topk_prob is False  # as llama.cpp's deepseek graph, which never renormalises
    with pytest.raises(StudioError, match=r"fits these models:\n  - DeepSeek MoE: has an ungated shared expert, and "
                                          r"the config gives it prompts$"):
        merged(families["llama"], tmp_path / "prompted", {"source_model": str(base), "positive_prompts": ["x"]},
               architecture="deepseek")


def test_deepseek_without_a_shared_expert_gets_one_of_zeros(families, tmp_path):
    """llama.cpp's deepseek graph always runs a shared expert, and its converter cannot read `n_shared_experts: null`."""
    base, _ = families["llama"]
    out, _ = same_as_base(families["llama"], tmp_path, architecture="deepseek")
    assert json.loads((out / "config.json").read_text())["n_shared_experts"] == 1
    written = output_tensors(out)
    for role, shape in (("gate", (128, 64)), ("up", (128, 64)), ("down", (64, 128))):
        tensor = written[f"model.layers.1.mlp.shared_experts.{role}_proj.weight"]
        assert tensor.shape == shape and not tensor.any()
    model = load(out, trust_remote_code=True)
    torch.testing.assert_close(model(input_ids=torch.tensor([TEXT_IDS])).logits, dense_logits(base),
                               atol=1e-5, rtol=1e-5)


# Runs under transformers 4.x (.venv-tf4): the Qwen outputs are transformers' own classes there too.
TF4_LOAD = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM

job = json.loads(sys.argv[1])
results = {}
for name, folder in job["outputs"].items():
    model, info = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor([job["ids"]])).logits
    results[name] = {"class": type(model).__name__, "problems": {k: sorted(v) for k, v in info.items() if v},
                     "logits": logits.tolist()}
print(json.dumps(results))
"""


def test_qwen_outputs_load_alike_in_transformers_4(families, tmp_path):
    python = tf4_python()
    _, experts = families["mistral"]
    shared = {"source_model": str(experts[0]), "positive_prompts": ["12 + 7 ="]}
    # (4.x's Qwen2-MoE attention requires head_dim = hidden_size / heads, so no Llama with its own head_dim here)
    outputs = {"qwen2-without-shared": merged(families["qwen2"], tmp_path / "a")[0],
               "mistral-with-shared": merged(families["mistral"], tmp_path / "b", shared)[0],
               "qwen3": merged(families["qwen3"], tmp_path / "c")[0]}
    job = json.dumps({"outputs": {k: str(v) for k, v in outputs.items()}, "ids": TEXT_IDS})
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([str(python), "-c", TF4_LOAD, job], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, out in outputs.items():
        model = load(out)
        assert found[name]["class"] == type(model).__name__ and not found[name]["problems"], found[name]
        expected = model(input_ids=torch.tensor([TEXT_IDS])).logits
        torch.testing.assert_close(torch.tensor(found[name]["logits"]), expected, atol=1e-4, rtol=1e-4)
