"""Calibrated gates: the fit on its own, and through a merged model whose router inputs are known by construction."""

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from studio.build.calibrate import CONFIDENCE, _token_targets, fit_router, prompt_targets, ridge_router
from studio.build.gates import GateOptions, compute_gates
from studio.build.merge import merge
from studio.build.synthetic import make_family
from studio.config import Expert, load_yaml
from studio.errors import StudioError
from studio.prompts import prompt_ids

from conftest import PROMPTS, moe_yaml, plan_of

NEUTRAL = 4  # the embedding direction of every token that is not one expert's alone


def one_hot(labels: torch.Tensor, n: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(labels, n).float()


def test_prompt_targets_follow_positive_and_negative_prompts():
    experts = [Expert(source_model="a", positive_prompts=["x", "shared"], negative_prompts=["n"]),
               Expert(source_model="b", positive_prompts=["y", "shared"]),
               Expert(source_model="c", positive_prompts=["z"])]
    targets = prompt_targets(experts)
    assert targets["x"].tolist() == [1, 0, 0]
    assert targets["shared"].tolist() == [0.5, 0.5, 0]
    assert targets["n"].tolist() == [0, 0.5, 0.5]  # anything but expert 0


def test_fit_separates_clusters_at_the_wanted_confidence():
    torch.manual_seed(0)
    means = torch.randn(3, 32) * 2
    labels = torch.arange(3).repeat(40)
    x = means[labels] + 0.5 * torch.randn(120, 32)
    weights = torch.ones(120)
    router = fit_router(x, one_hot(labels, 3), weights)
    probs = (x @ router.T).softmax(dim=-1)
    assert probs.max(dim=-1).values.mean() == pytest.approx(CONFIDENCE, abs=1e-3)
    held_out = torch.arange(3).repeat(20)
    fresh = means[held_out] + 0.5 * torch.randn(60, 32)
    assert torch.equal((fresh @ router.T).argmax(dim=-1), held_out)


def test_ridge_router_recovers_a_linear_map_and_separates_clusters():
    torch.manual_seed(1)
    x = torch.randn(200, 16)
    mapping = torch.randn(16, 3)
    exact = ridge_router(x, x @ mapping, torch.ones(200), confidence=None, l2=1e-9)
    assert torch.allclose(exact, mapping.T, atol=1e-4)  # targets linear in x: the regression finds the map
    means = torch.randn(3, 32) * 2
    labels = torch.arange(3).repeat(40)
    clusters = means[labels] + 0.5 * torch.randn(120, 32)
    router = ridge_router(clusters, one_hot(labels, 3), torch.ones(120))
    assert (clusters @ router.T).softmax(dim=-1).max(dim=-1).values.mean() == pytest.approx(CONFIDENCE, abs=1e-3)
    assert torch.equal((clusters @ router.T).argmax(dim=-1), labels)


def test_each_groups_weight_is_shared_by_its_tokens_in_proportion_to_their_relative_weights():
    """A prompt and a text of expert 0, a text of expert 1, left-padded in one batch, BOS (1) left out: the text of
    expert 0 brings weights for its positions, so its group's weight of 1 is shared 1 : 1 : 1 (prompt) : 2 : 3."""
    keys = ["prompt", ("text", 0, 0), ("text", 1, 0)]
    ids = torch.tensor([[1, 5, 6, 7], [0, 1, 8, 9], [0, 0, 1, 4]])
    targets = {"prompt": one_hot(torch.tensor(0), 2), ("text", 0, 0): one_hot(torch.tensor(0), 2),
               ("text", 1, 0): one_hot(torch.tensor(1), 2)}
    relative = {("text", 0, 0): torch.tensor([9.0, 2.0, 3.0])}  # the first is BOS's, which is left out
    rows, weights, keep = _token_targets([(keys, ids, (ids > 0).long())], targets, [1], relative)
    assert rows.argmax(dim=-1).tolist() == [0, 0, 0, 0, 0, 1]
    assert weights.tolist() == pytest.approx([1 / 8, 1 / 8, 1 / 8, 2 / 8, 3 / 8, 1.0])
    assert keep[0].tolist() == [[False, True, True, True], [False, False, True, True], [False, False, False, True]]


def test_fit_works_under_a_callers_inference_mode():
    torch.manual_seed(2)
    with torch.inference_mode():
        x = torch.randn(3, 8)[torch.arange(3).repeat(10)] * 3 + 0.1 * torch.randn(30, 8)
        router = fit_router(x, one_hot(torch.arange(3).repeat(10), 3), torch.ones(30))
    assert torch.equal((x @ router.T).argmax(dim=-1), torch.arange(3).repeat(10))


def test_tokens_of_negative_prompts_avoid_their_expert():
    torch.manual_seed(1)
    means = torch.randn(3, 16) * 2
    labels = torch.arange(3).repeat(30)
    x = means[labels] + 0.3 * torch.randn(90, 16)
    targets = one_hot(labels, 3)
    targets[labels == 0] = torch.tensor([0.0, 0.5, 0.5])  # the first cluster is only a negative prompt of expert 0
    router = fit_router(x, targets, torch.ones(90))
    probs = (means[0] @ router.T).softmax(dim=-1)
    assert probs[0] < 0.05


@pytest.fixture(scope="module")
def constructed(tmp_path_factory, tokenizer):
    """A family whose residual stream stays the token embedding (attention output and MLP down projections are
    zero), where the tokens of expert k's prompts alone have the embedding e_k and every other token e_4. So in
    every layer, the router input of expert k's tokens is the same vector, and a router that separates them
    exists: every such token must go to expert k, in every layer."""
    base, experts = make_family(tmp_path_factory.mktemp("constructed"), 4, layers=3, tokenizer=tokenizer)
    groups: dict[int, set[int]] = {}
    for k, prompts in enumerate(PROMPTS):
        for prompt in prompts:
            for token in prompt_ids(tokenizer, prompt):
                groups.setdefault(token, set()).add(k)
    own = {token: next(iter(ks)) for token, ks in groups.items() if len(ks) == 1}
    for folder in [base, *experts]:
        path = folder / "model.safetensors"
        state = load_file(path)
        embed = torch.zeros_like(state["model.embed_tokens.weight"])
        embed[:, NEUTRAL] = 1
        for token, k in own.items():
            embed[token] = 0
            embed[token, k] = 1
        state["model.embed_tokens.weight"] = embed
        for name in state:
            if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                state[name] = torch.zeros_like(state[name])
            if name.endswith("post_attention_layernorm.weight"):
                state[name] = torch.ones_like(state[name])
        save_file(state, path, metadata={"format": "pt"})
    return base, experts, own


def test_calibrated_gates_send_each_experts_tokens_to_it_in_every_layer(constructed):
    base, experts, own = constructed
    config = load_yaml(yaml.safe_dump(moe_yaml(base, experts, gate_mode="calibrated")))
    logs = []
    gates = compute_gates(plan_of(config), GateOptions(), log=logs.append)
    assert gates.shape == (3, 4, 64)
    hidden = 64
    for k in range(4):
        x = torch.zeros(hidden)
        x[k] = hidden ** 0.5  # RMS-normalised e_k
        for layer in range(3):
            assert int((gates[layer] @ x).argmax()) == k
    assert [line.split(":")[0] for line in logs if line.startswith("Layer")] == ["Layer 0", "Layer 1", "Layer 2"]
    assert sorted(set(own.values())) == [0, 1, 2, 3]


def test_calibrated_merge_writes_the_fitted_routers(constructed, tmp_path):
    base, experts, _ = constructed
    config = load_yaml(yaml.safe_dump(moe_yaml(base, experts, gate_mode="calibrated")))
    gates = compute_gates(plan_of(config), GateOptions(), log=lambda m: None)
    merge(config, tmp_path / "moe", log=lambda m: None)
    written = {}
    for path in (tmp_path / "moe").glob("*.safetensors"):
        written.update(load_file(path))
    for layer in range(3):
        assert torch.equal(written[f"model.layers.{layer}.block_sparse_moe.gate.weight"],
                           gates[layer].to(torch.bfloat16))


def test_chat_prompt_format_wraps_prompts_in_the_template(constructed):
    base, experts, _ = constructed
    raw = load_yaml(yaml.safe_dump(moe_yaml(base, experts, gate_mode="hidden")))
    chat = raw.model_copy(update={"prompt_format": "chat"})
    assert not torch.equal(compute_gates(plan_of(raw), GateOptions(), log=lambda m: None),
                           compute_gates(plan_of(chat), GateOptions(), log=lambda m: None))


def test_calibrated_gates_refuse_a_shared_expert_with_prompts(constructed):
    base, experts, _ = constructed
    data = moe_yaml(base, experts, gate_mode="calibrated", architecture="Qwen MoE")
    data["shared_experts"] = [{"source_model": str(experts[0]), "positive_prompts": ["x"]}]
    with pytest.raises(StudioError, match="give the shared expert no prompts"):
        merge(load_yaml(yaml.safe_dump(data)), base.parent / "never", log=lambda m: None)
    assert not (base.parent / "never").exists()
