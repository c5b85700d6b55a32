"""Router capture on Mixtral, Qwen2-MoE (with a dense layer and a shared expert) and Qwen3-MoE.

The hooks must see exactly what a plain forward reports with `output_router_logits`, in transformers 5
(routers return a tuple) and 4.x (routers return the logits), and a RouterTrace must survive JSON and CSV.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

from studio.errors import StudioError
from studio.inspect.routing import RouterCapture, expert_labels, find_routers, router_probabilities
from studio.trace import RouterTrace

from helpers import FAMILIES, ROOT, captured, plain_forward_probabilities, tf4_python

IDS = [1, 17, 42, 99, 200, 7, 300, 5, 383, 64, 2, 11]


@pytest.mark.parametrize("family", FAMILIES)
def test_hooks_see_exactly_the_router_logits_of_a_plain_forward(tiny_moes, family):
    model = AutoModelForCausalLM.from_pretrained(tiny_moes[family], dtype=torch.float32).eval()
    experts = model.config.num_local_experts if family == "mixtral" else model.config.num_experts
    trace = captured(model, IDS, [f"e{i}" for i in range(experts)])
    expected = plain_forward_probabilities(model, IDS)
    assert trace.layers == FAMILIES[family][2]
    assert torch.equal(trace.probabilities, expected)
    top = expected.topk(2, dim=-1)
    assert torch.equal(trace.experts, top.indices)
    # Mixtral renormalizes the two chosen weights; Qwen's default (norm_topk_prob false) keeps the softmax values.
    renormalized = top.values / top.values.sum(dim=-1, keepdim=True)
    torch.testing.assert_close(trace.weights, renormalized if family == "mixtral" else top.values)


def test_routers_are_found_by_name_and_width_not_shared_expert_gates(tiny_moes):
    model = AutoModelForCausalLM.from_pretrained(tiny_moes["qwen2_moe"], dtype=torch.float32)
    routers = find_routers(model)
    assert list(routers) == [0, 2]
    assert all(router is model.model.layers[i].mlp.gate for i, router in routers.items())


def test_a_trace_must_cover_the_sequence_it_names(tiny_moes):
    model = AutoModelForCausalLM.from_pretrained(tiny_moes["mixtral"], dtype=torch.float32)
    with torch.no_grad(), RouterCapture(model) as capture:
        model(input_ids=torch.tensor([IDS]))
    with pytest.raises(StudioError, match="saw 12 tokens for a sequence of 11"):
        capture.trace(IDS[:-1], ["x"] * 11, 5, ["a", "b", "c", "d"])
    capture.calls[0] = [output[2] for output in capture.calls[0]]  # as if the router returned its choices only
    with pytest.raises(StudioError, match="Layer 0's router does not return its logits first"):
        capture.trace(IDS, ["x"] * 12, 5, ["a", "b", "c", "d"])


def test_labels_come_from_the_merge_config(tmp_path):
    (tmp_path / "mergekit_moe_config.yml").write_text(
        "base_model: b\nexperts:\n  - source_model: org/code\n  - source_model: org/math\n")
    assert expert_labels(tmp_path, 2) == ["org/code", "org/math"]
    assert expert_labels(tmp_path, 3) == ["expert 0", "expert 1", "expert 2"]


@pytest.fixture(scope="module")
def trace(tiny_moes) -> RouterTrace:
    model = AutoModelForCausalLM.from_pretrained(tiny_moes["qwen3_moe"], dtype=torch.float32).eval()
    return captured(model, IDS, [f"org/expert-{i}" for i in range(8)])


def test_trace_json_round_trip_is_exact(trace, tmp_path):
    trace.save(tmp_path / "trace.json")
    back = RouterTrace.load(tmp_path / "trace.json")
    assert (back.tokens, back.token_ids, back.prompt_length, back.labels, back.layers) == \
        (trace.tokens, trace.token_ids, trace.prompt_length, trace.labels, trace.layers)
    for name in ("probabilities", "experts", "weights"):
        assert torch.equal(getattr(back, name), getattr(trace, name)), name


def test_trace_csv_has_one_row_per_token_and_layer(trace):
    rows = list(csv.DictReader(io.StringIO(trace.to_csv())))
    assert len(rows) == len(IDS) * 3
    row = rows[3 * 7 + 2]  # token 7, third MoE layer
    assert (row["position"], row["part"], row["token_id"], row["layer"]) == ("7", "answer", str(IDS[7]), "2")
    assert row["choice1"] == trace.labels[int(trace.experts[2, 7, 0])]
    assert float(row["weight2"]) == float(trace.weights[2, 7, 1])
    assert [float(row[f"p[org/expert-{e}]"]) for e in range(8)] == trace.probabilities[2, 7].tolist()


def test_trace_summaries(trace):
    top1 = trace.probabilities.argmax(dim=-1)
    assert torch.equal(trace.top1(), top1)
    answer = top1[:, 5:]
    assert trace.same_expert_rate("answer").tolist() == pytest.approx(
        [(row[1:] == row[:-1]).float().mean().item() for row in answer])
    load = trace.expert_load("prompt")
    assert load.sum(dim=1).tolist() == pytest.approx([1.0] * 3)
    assert load[1, 3].item() == pytest.approx((trace.experts[1, :5] == 3).sum().item() / 10)
    expert, share = trace.dominant("answer")[0]
    counts = [int((answer[0] == e).sum()) for e in range(8)]
    assert counts[expert] == max(counts) and share == counts[expert] / 7


def test_trace_errors_name_the_problem(trace, tmp_path):
    with pytest.raises(StudioError, match="Layer 7 has no router; the MoE layers are 0, 1, 2"):
        trace.layer_position(7)
    with pytest.raises(StudioError, match="Unknown part 'middle'"):
        trace.span("middle")
    (tmp_path / "other.json").write_text(json.dumps({"tokens": []}))
    with pytest.raises(StudioError, match="Not a router trace"):
        RouterTrace.load(tmp_path / "other.json")
    with pytest.raises(StudioError, match="Cannot read router trace"):
        RouterTrace.load(tmp_path / "missing.json")


# Runs under transformers 4.x (.venv-tf4): routers return plain logits tensors there.
TF4_SCRIPT = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM
from studio.inspect.routing import RouterCapture, find_routers

job = json.loads(sys.argv[1])
results = {}
for family, folder in job["models"].items():
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    kinds = set()
    for router in find_routers(model).values():
        router.register_forward_hook(lambda module, args, output: kinds.add(type(output).__name__))
    ids = job["ids"]
    with torch.no_grad():
        with RouterCapture(model) as capture:
            model(input_ids=torch.tensor([ids]))
        out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
    expected = torch.stack([l.float().softmax(-1) for l in out.router_logits if l is not None])
    trace = capture.trace(ids, [str(i) for i in ids], 5, ["e"] * expected.shape[-1])
    top = expected.topk(2, dim=-1)
    renormalized = top.values / top.values.sum(-1, keepdim=True)
    results[family] = {
        "output_types": sorted(kinds), "layers": trace.layers,
        "max_probability_diff": (trace.probabilities - expected).abs().max().item(),
        "experts_equal": torch.equal(trace.experts, top.indices),
        "weights_renormalized": torch.allclose(trace.weights, renormalized),
        "weights_are_probabilities": torch.allclose(trace.weights, top.values),
    }
print(json.dumps(results))
"""


def test_capture_works_with_transformers_4_router_tensors(tiny_moes):
    job = {"models": {k: str(v) for k, v in tiny_moes.items()}, "ids": IDS}
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.run([str(tf4_python()), "-c", TF4_SCRIPT, json.dumps(job)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for family, result in results.items():
        assert result["output_types"] == ["Tensor"], family
        assert result["layers"] == FAMILIES[family][2], family
        assert result["max_probability_diff"] == 0.0, family
        assert result["experts_equal"], family
        assert result["weights_renormalized" if family == "mixtral" else "weights_are_probabilities"], family


def test_routers_that_return_probabilities_are_not_softmaxed_again():
    """Gemma 4's router returns (probabilities, weights, experts) and keeps its projection in a `proj` child."""
    config = transformers.Gemma4TextConfig(
        vocab_size=384, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, enable_moe_block=True, num_experts=4, top_k_experts=2,
        moe_intermediate_size=32, layer_types=["full_attention"] * 2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert list(find_routers(model)) == [0, 1]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([IDS]), output_router_logits=True)
    expected = torch.stack([p.float() for p in out.router_logits])  # already probabilities
    assert torch.allclose(expected.sum(dim=-1), torch.ones(2, len(IDS)))
    trace = captured(model, IDS, [f"e{i}" for i in range(4)])
    assert torch.equal(trace.probabilities, expected)
    assert torch.equal(router_probabilities(model, IDS), expected)
    assert torch.equal(trace.experts, expected.topk(2, dim=-1).indices)
