import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from studio.build.gates import GateOptions, compute_gates, degenerate_gate_warning
from studio.config import load_yaml
from studio.sources import open_model

from conftest import moe_yaml, plan_of


def config_for(family, **top):
    base, experts = family
    data = moe_yaml(base, experts, **top)
    data["experts"][0]["negative_prompts"] = ["Once upon a time"]
    return load_yaml(__import__("yaml").safe_dump(data))


def last_token_states(base_folder, prompt: str) -> torch.Tensor:
    """The formula's h_l(p), computed the plain way: one unpadded prompt at a time."""
    tokenizer = AutoTokenizer.from_pretrained(base_folder)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.bfloat16).eval()
    ids = tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return torch.stack([h[0, -1] for h in out.hidden_states[:-1]]).float()


def unit(v):
    return v / v.norm(dim=-1, keepdim=True)


def test_hidden_gates_follow_the_formula(mistral):
    config = config_for(mistral)
    gates = compute_gates(plan_of(config), GateOptions(batch_size=3), log=lambda m: None)
    assert gates.shape == (2, 4, 64)
    for e, expert in enumerate(config.experts):
        positive = torch.stack([last_token_states(mistral[0], p) for p in expert.positive_prompts]).mean(0)
        negative = torch.stack([last_token_states(mistral[0], p) for p in expert.negative_prompts or []]).mean(0) \
            if expert.negative_prompts else 0
        expected = unit(positive - negative)
        torch.testing.assert_close(gates[:, e], expected, atol=2e-2, rtol=0)
        assert torch.allclose(gates[:, e].norm(dim=-1), torch.ones(2))


def test_hidden_gates_do_not_depend_on_batch_size(mistral):
    config = config_for(mistral)
    one = compute_gates(plan_of(config), GateOptions(batch_size=1), log=lambda m: None)
    many = compute_gates(plan_of(config), GateOptions(batch_size=64), log=lambda m: None)
    torch.testing.assert_close(one, many, atol=2e-2, rtol=0)


def test_cheap_embed_is_the_normalised_embedding_sum_in_every_layer(mistral):
    config = config_for(mistral, gate_mode="cheap_embed")
    base = open_model(str(mistral[0]))
    gates = compute_gates(plan_of(config), GateOptions(), log=lambda m: None)
    tokenizer = AutoTokenizer.from_pretrained(mistral[0])
    embedding = base.read("model.embed_tokens.weight").float()

    def summed(prompts):
        ids = [i for p in prompts for i in tokenizer("<s>" + p, add_special_tokens=False)["input_ids"]]
        return unit(embedding[ids].sum(0))

    for e, expert in enumerate(config.experts):
        row = summed(expert.positive_prompts)
        if expert.negative_prompts:
            row = unit(row - summed(expert.negative_prompts))
        for layer in range(2):
            torch.testing.assert_close(gates[layer, e], row)


@pytest.mark.parametrize("mode", ["random", "uniform_random"])
def test_random_gates_are_reproducible_with_a_seed(mistral, mode):
    plan = plan_of(config_for(mistral, gate_mode=mode))
    first, second, other = (compute_gates(plan, GateOptions(seed=s)) for s in (7, 7, 8))
    assert torch.equal(first, second) and not torch.equal(first, other)
    if mode == "uniform_random":
        assert first.abs().max() <= 64 ** -0.5
    else:
        assert 0.8 < first.std() < 1.2


def test_degenerate_warning_names_layers_and_the_alike_pair():
    torch.manual_seed(0)
    gates = torch.randn(3, 3, 32)
    gates[1, 2] = gates[1, 0] + 0.01 * torch.randn(32)
    gates[2, 2] = gates[2, 0] + 0.01 * torch.randn(32)
    warning = degenerate_gate_warning(gates, ["code", "math", "story"])
    assert "2 of 3 layers" in warning
    assert "layers 1-2: experts 0 (code) and 2 (story) are most alike" in warning
    assert degenerate_gate_warning(torch.linalg.qr(torch.randn(1, 32, 3))[0].transpose(1, 2), list("abc")) is None
