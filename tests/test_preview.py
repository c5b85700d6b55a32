"""The routing preview, computed without a merge, agrees with the routing of the merged model."""

from pathlib import Path

import pytest
import torch
import yaml

from studio.app.cli import main
from studio.build.merge import merge
from studio.build.preview import preview_routing, summary_rows
from studio.build.synthetic import make_family
from studio.config import load_config, load_yaml
from studio.errors import StudioError
from studio.inspect.routing import load_moe, router_probabilities

from conftest import moe_yaml

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["def parse(line):\n    return line.split()", "35 - 25 = 10", "Once, there was a kind duck named Vera",
           "<|user|>\nHow do I sleep better?</s>"]


@pytest.fixture(scope="module")
def zoo_config(monkeypatch_module):
    monkeypatch_module.chdir(ROOT)  # the example config's paths are relative to the project folder
    return load_config(ROOT / "assets" / "examples" / "zoo-fragments.yml")


@pytest.mark.parametrize("mode", ["calibrated", "hidden"])
def test_preview_agrees_with_the_merged_model(zoo_config, tmp_path, mode):
    config = zoo_config.model_copy(update={"gate_mode": mode})
    traces = preview_routing(config, PROMPTS, log=lambda m: None)
    merge(config, tmp_path / "moe", log=lambda m: None)
    model, _ = load_moe(tmp_path / "moe")
    for trace in traces:
        merged = router_probabilities(model, trace.token_ids)  # (layers, tokens, experts)
        torch.testing.assert_close(trace.probabilities, merged, atol=1e-4, rtol=1e-4)
        assert torch.equal(trace.experts, merged.topk(2, dim=-1).indices)
        assert trace.labels == [e.source_model for e in config.experts]
        assert "".join(trace.tokens[1:]) == PROMPTS[traces.index(trace)]


def test_preview_of_the_calibrated_zoo_routes_each_domain_to_its_expert(zoo_config):
    traces = preview_routing(zoo_config.model_copy(update={"gate_mode": "calibrated"}), PROMPTS, log=lambda m: None)
    for k, trace in enumerate(traces):
        majority = trace.top1()[:, 1:].mode(dim=1).values  # per layer, over the prompt's tokens after BOS
        assert majority.tolist() == [k] * 4


def test_preview_cli_prints_the_table(zoo_config, capsys):
    assert main(["preview", "assets/examples/zoo-fragments.yml", "12 + 7 = 19", "--gate-mode", "calibrated"]) == 0
    out = capsys.readouterr().out
    assert "First-choice expert" in out and "assets/zoo/math" in out


def test_preview_explains_what_it_cannot_run(tmp_path, tokenizer):
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0, "original_max_position_embeddings": 128}
    base, experts = make_family(tmp_path, 2, "llama", tokenizer=tokenizer, rope_parameters=yarn)
    data = moe_yaml(base, experts)
    with pytest.raises(StudioError, match="rope type 'yarn'.*gate_mode: hidden"):
        preview_routing(load_yaml(yaml.safe_dump(data)), ["hi"], log=lambda m: None)


def test_chat_prompt_format_routes_the_prompt_as_a_user_turn(zoo_config):
    config = zoo_config.model_copy(update={"gate_mode": "calibrated", "prompt_format": "chat"})
    trace, = preview_routing(config, ["What is the capital of Peru?"], log=lambda m: None)
    assert "".join(trace.tokens) == "<|user|>\nWhat is the capital of Peru?</s>\n<|assistant|>\n"
    assert trace.dominant("prompt")[-1][0] == 3  # the chat expert


def test_summary_rows_name_the_dominant_expert_per_layer(zoo_config):
    prompts = ["35 - 25 = 10", "Once upon a time there was a fox"]
    traces = preview_routing(zoo_config.model_copy(update={"gate_mode": "calibrated"}), prompts, log=lambda m: None)
    rows = summary_rows(prompts, traces)
    assert [row[0] for row in rows] == prompts
    for row, trace in zip(rows, traces):
        expected = [f"{Path(trace.labels[e]).name} {share:.0%}" for e, share in trace.dominant("prompt")]
        assert row[1:] == expected and len(expected) == 4
    assert rows[0][1].startswith("math") and rows[1][1].startswith("stories")


@pytest.mark.parametrize("family, architecture", [("qwen3", "Qwen3 MoE"), ("mistral", "Qwen MoE")])
def test_preview_agrees_with_qwen_moe_outputs(tmp_path, tokenizer, family, architecture):
    """The streamed MoE is the output's own: Qwen3-MoE (q_norm, k_norm), and Qwen2-MoE from a Mistral base (zero
    q/k/v biases, a zero-width shared expert)."""
    base, experts = make_family(tmp_path / family, 4, family, tokenizer=tokenizer, dtype=torch.float32)
    config = load_yaml(yaml.safe_dump(moe_yaml(base, experts, gate_mode="calibrated", dtype="float32",
                                               architecture=architecture)))
    prompts = ["def add(a, b):", "Once upon a time there was"]
    traces = preview_routing(config, prompts, log=lambda m: None)
    merge(config, tmp_path / "moe", log=lambda m: None)
    model, _ = load_moe(tmp_path / "moe")
    for trace in traces:
        merged = router_probabilities(model, trace.token_ids)
        torch.testing.assert_close(trace.probabilities, merged, atol=1e-4, rtol=1e-4)
        assert torch.equal(trace.experts, merged.topk(2, dim=-1).indices)


@pytest.mark.parametrize("architecture, mode, prompted", [("Qwen MoE", "hidden", True), ("Qwen MoE", "calibrated", False),
                                                          ("DeepSeek MoE", "calibrated", False)])
def test_preview_agrees_with_outputs_that_have_a_shared_expert(mistral, tmp_path, architecture, mode, prompted):
    """A shared expert sees every token: behind its sigmoid gate (Qwen2-MoE, prompted) or ungated."""
    base, experts = mistral
    data = moe_yaml(base, experts, gate_mode=mode, dtype="float32", architecture=architecture)
    data["shared_experts"] = [{"source_model": str(experts[1]), "residual_scale": 0.5,
                               **({"positive_prompts": ["Hello there", "import os"]} if prompted else {})}]
    config = load_yaml(yaml.safe_dump(data))
    traces = preview_routing(config, ["def add(a, b):", "Once upon a time there was"], log=lambda m: None)
    merge(config, tmp_path / "moe", log=lambda m: None)
    model, _ = load_moe(tmp_path / "moe", trust_remote_code=True)
    for trace in traces:
        merged = router_probabilities(model, trace.token_ids)
        torch.testing.assert_close(trace.probabilities, merged, atol=1e-4, rtol=1e-4)
        assert torch.equal(trace.experts, merged.topk(2, dim=-1).indices)
