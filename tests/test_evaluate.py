"""The routing evaluation on a model whose routing is known by construction.

The residual stream is made to stay equal to the token embedding (attention and expert outputs zeroed),
each token's embedding is the unit vector e_(id mod 4), and router row k is e_k: so in every layer token t
goes to expert t mod 4, and every number of the report can be computed from the token ids alone.
"""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from studio.build.merge import MergeOptions, merge
from studio.config import load_yaml
from studio.errors import StudioError
from studio.inspect.evaluate import evaluate_routing, load_prompts, resolve_expert

from conftest import moe_yaml

PROMPTS = {0: ["def add(a, b):", "import os"], "expert2": ["Once upon a time there was a fox"],
           3: ["Hello, how are you today?", "12 + 7 = 19"]}


@pytest.fixture(scope="module")
def constructed(mistral, tmp_path_factory):
    base, experts = mistral
    out = tmp_path_factory.mktemp("constructed") / "moe"
    merge(load_yaml(yaml.safe_dump(moe_yaml(base, experts, gate_mode="random"))), out,
          MergeOptions(random_seed=0), log=lambda m: None)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.zero_()
        embed[torch.arange(embed.shape[0]), torch.arange(embed.shape[0]) % 4] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.experts.down_proj.zero_()
            layer.post_attention_layernorm.weight.fill_(1.0)
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[torch.arange(4), torch.arange(4)] = 1.0
    return out, model, AutoTokenizer.from_pretrained(out)


def token_groups(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the BOS is not counted
    return torch.tensor(ids) % 4


def test_report_matches_the_construction(constructed):
    out, model, tokenizer = constructed
    report = evaluate_routing(model, PROMPTS, tokenizer, labels=[f"m/expert{i + 1}" for i in range(4)])
    assert report.intended == [0, 1, 3] and report.prompts == [2, 1, 2]
    for g, (key, texts) in enumerate(PROMPTS.items()):
        k = report.intended[g]
        groups = [token_groups(tokenizer, t) for t in texts]
        share = torch.cat(groups).eq(k).float().mean().item()
        assert report.token_share[g] == pytest.approx([share] * 2)
        majorities = [int(x.mode().values) for x in groups]
        assert report.prompt_share[g] == pytest.approx([sum(m == k for m in majorities) / len(texts)] * 2)
        assert report.majority_of_layers[g] == pytest.approx(sum(m == k for m in majorities) / len(texts))
        assert report.every_layer[g] == report.majority_of_layers[g]  # the construction routes alike in each layer
        expected = torch.bincount(torch.tensor(majorities).repeat(2), minlength=4).tolist()
        assert report.confusion[g] == expected
    all_groups = [token_groups(tokenizer, t) for texts in PROMPTS.values() for t in texts]
    kept = sum(int((x[1:] == x[:-1]).sum()) for x in all_groups)
    pairs = sum(len(x) - 1 for x in all_groups)
    assert report.same_expert_rate == pytest.approx([kept / pairs] * 2)
    assert report.random_same_expert_rate == 0.25
    text = report.table()
    assert "intended expert" in text and "Confusion" in text and "m/expert4" in text
    names = [f"{i}: {Path(label).name}" for i, label in enumerate(report.labels)]
    header = next(line for line in text.splitlines() if line.startswith("intended \\ chosen"))
    assert header.split()[3:] == " ".join(names).split()  # the columns are named as the rows are


def test_experts_are_named_by_index_source_model_or_folder_name(tmp_path):
    labels = ["/models/code", "org/math", "org/stories"]
    assert resolve_expert(1, labels) == 1 and resolve_expert("2", labels) == 2
    assert resolve_expert("code", labels) == 0 and resolve_expert("org/math", labels) == 1
    with pytest.raises(StudioError, match="names none"):
        resolve_expert("poetry", labels)
    bad = tmp_path / "p.yml"
    bad.write_text("- a\n")
    with pytest.raises(StudioError, match="expected a mapping"):
        load_prompts(bad)


def test_cli_reads_labels_from_the_merge(constructed, tmp_path, mistral):
    from studio.app.cli import main

    out, _, _ = constructed
    prompts = tmp_path / "prompts.yml"
    prompts.write_text(yaml.safe_dump({"expert1": ["def add(a, b):"], 3: ["Hello"]}))
    assert main(["eval-routing", str(out), str(prompts)]) == 0
