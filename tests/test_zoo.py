"""The bundled zoo: its models load, each expert is best on its own domain, and the merged MoE routes by domain."""

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from studio.build.merge import MergeOptions, merge
from studio.config import load_config
from studio.inspect.evaluate import evaluate_routing, load_prompts
from studio.inspect.quality import measure_quality
from studio.zoo.corpora import DOMAINS, code_only, code_text, corpus
from studio.zoo.train import ZOO_DIR, Recipe, expert_data, held_out_ids, held_out_loss, windows

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("base", *DOMAINS)
MARGIN = 0.05  # nats: how much better an expert must be on its own domain than the base and every other expert


@pytest.fixture(scope="module")
def zoo_models():
    return {name: AutoModelForCausalLM.from_pretrained(ZOO_DIR / name, dtype=torch.float32).eval() for name in MODELS}


@pytest.fixture(scope="module")
def zoo_moe(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.chdir(ROOT)  # the example config's paths are relative to the project folder
    out = tmp_path_factory.mktemp("zoo") / "zoo-4x"
    merge(load_config(ROOT / "assets" / "examples" / "zoo-fragments.yml"), out, log=lambda m: None)
    return out


def test_code_corpus_is_code_without_comments_or_docstrings():
    source = '"""Module."""\n# a comment\nclass A:\n    """Class."""\n\n    def f(self):\n        """Doc."""\n' \
             '        return 1  # one\n\ndef g():\n    """Only a docstring."""\n'
    assert code_only(source) == "class A:\n\n    def f(self):\n        return 1\n\ndef g():\n    pass"
    for held_out in (False, True):
        lines = code_text(held_out).splitlines()
        assert not any(line.lstrip().startswith(("#", '"""', "'''")) for line in lines)


def test_expert_batches_are_three_quarters_own_domain_and_one_row_of_each_domain():
    data = {domain: torch.full((400,), i) for i, domain in enumerate(DOMAINS)}
    recipe = Recipe()
    for i, domain in enumerate(DOMAINS):
        rows = windows(expert_data(domain, data, recipe), recipe, torch.Generator().manual_seed(0))[:, 0]
        counts = torch.bincount(rows, minlength=len(DOMAINS)).tolist()
        assert counts == [13 if j == i else 1 for j in range(len(DOMAINS))], (domain, counts)


def test_zoo_models_load_with_tokenizer_and_chat_template(zoo_models):
    total = sum(p.stat().st_size for p in ZOO_DIR.rglob("*.safetensors"))
    assert total <= 30e6
    for name, model in zoo_models.items():
        assert type(model).__name__ == "MistralForCausalLM"
        assert model.config.tie_word_embeddings
        tokenizer = AutoTokenizer.from_pretrained(ZOO_DIR / name)
        text = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                             add_generation_prompt=True)
        assert text == "<|user|>\nHi</s>\n<|assistant|>\n"


def test_experts_share_everything_but_their_mlps(zoo_models):
    base = zoo_models["base"].state_dict()
    for domain in DOMAINS:
        expert = zoo_models[domain].state_dict()
        for name, tensor in base.items():
            assert torch.equal(expert[name], tensor) == (".mlp." not in name), name


def test_each_expert_is_best_on_its_own_domain(zoo_models):
    """The held-out evaluation of `python -m studio.zoo train`, on the committed weights."""
    tokenizer = AutoTokenizer.from_pretrained(ZOO_DIR / "base")
    recipe = Recipe()
    for domain, ids in held_out_ids(tokenizer, recipe).items():
        row = {name: held_out_loss(model, ids, recipe.seq) for name, model in zoo_models.items()}
        others = min(loss for name, loss in row.items() if name != domain)
        assert row[domain] + MARGIN < others, f"{domain}: {row}"


def greedy_completion(model, tokenizer, prompt: str, tokens: int = 32) -> str:
    inputs = tokenizer("<s>" + prompt, add_special_tokens=False, return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


@pytest.fixture(scope="module")
def moe_and_tokenizer(zoo_moe):
    model = AutoModelForCausalLM.from_pretrained(zoo_moe, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(zoo_moe)


@pytest.fixture(scope="module")
def unigram_log_probs(moe_and_tokenizer) -> dict[str, torch.Tensor]:
    """Per domain, the log frequency of each token in its training text (add-one smoothed)."""
    tokenizer = moe_and_tokenizer[1]
    log_probs = {}
    for domain in DOMAINS:
        ids = torch.tensor(tokenizer(corpus(domain, 200_000, seed=0), add_special_tokens=False)["input_ids"])
        counts = torch.bincount(ids, minlength=len(tokenizer)).double() + 1
        log_probs[domain] = (counts / counts.sum()).log()
    return log_probs


def test_merged_zoo_answers_arithmetic_and_stories(moe_and_tokenizer):
    assert re.match(r"\s*\d+", greedy_completion(*moe_and_tokenizer, "12 + 7 =", 24))
    story = greedy_completion(*moe_and_tokenizer, "Once upon a time", 24)
    assert re.search(r"\b(there|was|a|the|named|lived)\b", story), story


@pytest.mark.parametrize("header", ["def parse(line):", "def __init__(self, name):", "def add(a, b):", "class Stack:"])
def test_merged_zoo_writes_a_python_body_after_a_def_header(moe_and_tokenizer, unigram_log_probs, header):
    """The body starts on an indented line, and its tokens are likelier under the code corpus's token frequencies
    than under a story's, a chat reply's or a word problem's (where a body drifts when its words are routed to
    other experts)."""
    completion = greedy_completion(*moe_and_tokenizer, header)
    assert re.match(r"\n( {4})+\S", completion), completion
    ids = torch.tensor(moe_and_tokenizer[1](completion, add_special_tokens=False)["input_ids"])
    scores = {domain: log_probs[ids].sum().item() for domain, log_probs in unigram_log_probs.items()}
    assert max(scores, key=scores.get) == "code", (completion, scores)


def test_hidden_gates_route_most_held_out_prompts_of_each_domain_to_their_expert(zoo_moe, tmp_path, monkeypatch_module):
    prompts = load_prompts(ZOO_DIR / "eval-prompts.yml")
    hidden = evaluate_routing(zoo_moe, prompts)
    config = load_config(ROOT / "assets" / "examples" / "zoo-fragments.yml").model_copy(update={"gate_mode": "random"})
    merge(config, tmp_path / "random", MergeOptions(random_seed=0), log=lambda m: None)
    random = evaluate_routing(tmp_path / "random", prompts)
    mean = lambda report: sum(report.majority_of_layers) / len(report.majority_of_layers)  # noqa: E731
    assert mean(hidden) > mean(random) + 0.3, f"{hidden.table()}\n{random.table()}"
    # The zoo config's target: >= 80% of each domain's held-out prompts reach their expert in most layers.
    assert min(hidden.majority_of_layers) >= 0.8, hidden.table()


@pytest.fixture(scope="module")
def calibrated_moe(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.chdir(ROOT)
    config = load_config(ROOT / "assets" / "examples" / "zoo-fragments.yml").model_copy(update={"gate_mode": "calibrated"})
    out = tmp_path_factory.mktemp("zoo") / "calibrated"
    merge(config, out, log=lambda m: None)
    return out


def test_calibrated_gates_route_held_out_prompts_to_their_expert_in_every_layer(calibrated_moe):
    report = evaluate_routing(calibrated_moe, load_prompts(ZOO_DIR / "eval-prompts.yml"))
    assert min(report.every_layer) >= 0.95, report.table()


def test_calibrated_moe_has_a_lower_held_out_loss_than_hidden_on_every_domain(calibrated_moe, zoo_moe):
    tokenizer = AutoTokenizer.from_pretrained(ZOO_DIR / "base")
    recipe = Recipe()
    models = {name: AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
              for name, path in (("calibrated", calibrated_moe), ("hidden", zoo_moe))}
    for domain, ids in held_out_ids(tokenizer, recipe).items():
        loss = {name: held_out_loss(model, ids, recipe.seq) for name, model in models.items()}
        assert loss["calibrated"] < loss["hidden"], f"{domain}: {loss}"


@pytest.fixture(scope="module")
def natural_moes(tmp_path_factory, monkeypatch_module):
    """The studio's default zoo config (natural prompts, gate_mode: expert_text), and the same config under
    mergekit's `hidden`."""
    monkeypatch_module.chdir(ROOT)
    config = load_config(ROOT / "assets" / "examples" / "zoo-4x.yml")
    folder = tmp_path_factory.mktemp("natural")
    for mode in ("expert_text", "hidden"):
        merge(config.model_copy(update={"gate_mode": mode}), folder / mode, log=lambda m: None)
    return folder


def test_natural_prompts_reach_their_expert_under_expert_text(natural_moes):
    prompts = load_prompts(ROOT / "benchmarks" / "natural" / "eval-prompts.yml")  # written apart from the config
    report = evaluate_routing(natural_moes / "expert_text", prompts)
    # 8 of 12 math prompts at worst: the questions the chat expert shares ("How much is 14 times 3?", "What is half of
    # 64?", "What is 81 minus 27?") go to chat since the math expert's own chats are no longer its calibration text
    # (README: `expert_text`).
    assert min(report.majority_of_layers) >= 0.66, report.table()


def test_expert_text_keeps_more_of_each_experts_gain_than_hidden_and_beats_the_base(natural_moes):
    text = measure_quality(natural_moes / "expert_text", "zoo", max_tokens=10**9, log=lambda m: None)
    hidden = measure_quality(natural_moes / "hidden", "zoo", max_tokens=10**9, log=lambda m: None)
    for ours, theirs in zip(text.domains, hidden.domains):
        assert ours.moe < ours.base, text.table()
        assert ours.recovered >= 0.5 and ours.recovered > theirs.recovered, f"{text.table()}\n{hidden.table()}"


def test_bare_keywords_lead_the_math_expert_astray_and_texts_from_a_documents_start_serve():
    """The zoo's math expert never learnt the words "math", "arithmetic" or "calculate": after them it writes garbled
    code, which would teach the routers to send code to it. So its texts written from a document's start, which are
    arithmetic, become its calibration text instead; no other expert is led astray by Beyonder-style keywords. The
    others' texts from a document's start join theirs where they read like their kept continuations: the stories
    expert's stories do; the stories the chat expert writes there (which pass for its own) do not."""
    from functools import partial

    from studio.prompts import prompt_ids

    config, tokenizer, texts, log = _written_texts("keywords")
    assert [line.split(" (")[0] for line in log if "led it astray" in line] == ["Expert 1"]
    math = [tokenizer.decode(ids[1:]) for key, ids in texts.items() if key[1] == 1]
    assert len(math) >= 4 and all(re.search(r"\d+ [-+*/] \d+ = \d+", text) for text in math), math
    assert not any(text.startswith(("math", "arithmetic", "calculate")) for text in math)  # no continuation kept
    started = {k: [tokenizer.decode(ids[1:]) for key, ids in texts.items() if key[1] == k
                   and not any(ids[:len(p)] == p for p in map(partial(prompt_ids, tokenizer), e.positive_prompts))]
               for k, e in enumerate(config.experts)}
    assert len(started[2]) >= 6 and all(re.search(r"there was|named|appeared", text) for text in started[2])
    assert all("<|user|>" in text for text in started[3]), started[3]


def test_one_role_sentence_leads_the_math_expert_astray_and_its_arithmetic_from_a_documents_start_serves():
    """After "You are skilled in mathematics." (the Maixtchup guide's one role sentence) the zoo's math expert writes
    text barely ahead of the base; from a document's start it writes arithmetic, ten times as far ahead. Judged
    against the median of all its texts, the arithmetic was dropped as noise and 4 texts were left to fit the
    math router on; judged among the texts from a document's start, it is typical, and serves."""
    _, tokenizer, texts, log = _written_texts("one-line")
    assert any(line.startswith("Expert 1 ") and "led it astray" in line for line in log), log
    math = [tokenizer.decode(ids[1:]) for key, ids in texts.items() if key[1] == 1]
    assert len(math) >= 12 and all(re.search(r"\d+ [-+*/] \d+ = \d+", text) for text in math), math


def test_chats_the_stories_expert_writes_are_not_its_calibration_text():
    """After "The dragon opened one eye and saw the knight at the door." or "Tell me a bedtime story about a brave
    mouse." the zoo's stories expert (seed 0) writes chats, with its own slips ("The capital of Brazil is Lisbon.").
    It reads them better than the chat expert does (they are its own samples), so it leads there; but they read like
    the chat expert's text, and are not kept as stories (4 of its 38 texts were, before that check). A story whose
    last lines slip into garbled code and a stray user turn is still a story: no kept text holds an assistant's
    reply."""
    config, tokenizer, texts, _ = _written_texts("sentences")
    stories = [tokenizer.decode(ids) for key, ids in texts.items() if key[1] == 2]
    assert len(stories) >= 20 and not any("<|assistant|>" in text for text in stories), stories


def _written_texts(name: str):
    """The calibration text the experts of benchmarks/natural/NAME.yml write (seed 0), and the log."""
    from studio.build.expert_text import expert_texts
    from studio.prompts import prompt_ids
    from studio.sources import open_model

    config = load_config(ROOT / "benchmarks" / "natural" / f"{name}.yml")
    tokenizer = AutoTokenizer.from_pretrained(ZOO_DIR / "base")
    bos, log = [tokenizer.bos_token_id], []
    texts, _ = expert_texts(
        config.experts, [open_model(str(ROOT / e.source_model)) for e in config.experts],
        open_model(str(ROOT / config.base_model)), lambda prompt: prompt_ids(tokenizer, prompt),
        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], bos, bos, seed=0, log=log.append)
    return config, tokenizer, texts, log
