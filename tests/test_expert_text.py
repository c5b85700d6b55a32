"""gate_mode: expert_text: routers fitted on each expert's own text, written by the expert or given by the user."""

from collections import Counter
from pathlib import Path

import pytest
import torch

from studio.build import expert_text
from studio.build.expert_text import (kept_texts, load_writer, mean_log_probabilities, own_pieces, read_alike,
                                     samples_per_prompt, specific_pieces, typical_of_each, typical_pieces,
                                     write_text)
from studio.build.merge import MergeOptions, merge
from studio.config import check_rules, parse_config
from studio.errors import StudioError
from studio.inspect.routing import load_moe, router_probabilities
from studio.prompts import prompt_encoder
from studio.sources import open_model

from conftest import moe_yaml
from helpers import ALPHABETS, domain_text

@pytest.fixture(scope="module", params=["expert_text", "expert_text_ridge"])
def text_moe(mistral, tmp_path_factory, tokenizer, request):
    """A synthetic MoE whose four routers were fitted on four texts of disjoint alphabets (by the softmax fit, and
    by the closed-form ridge regression)."""
    folder = tmp_path_factory.mktemp("text-moe")
    base, experts = mistral
    data = moe_yaml(base, experts, gate_mode=request.param)
    for k, expert in enumerate(data["experts"]):
        path = folder / f"domain-{k}.txt"
        path.write_text(domain_text(ALPHABETS[k], seed=k))
        expert["calibration_text"] = [str(path)]
    log = []
    merge(parse_config(data), folder / "moe", log=log.append)
    return folder / "moe", log


def test_tokens_of_each_alphabet_go_to_their_expert_in_every_layer(text_moe, tokenizer):
    model, _ = load_moe(text_moe[0])
    for k, alphabet in enumerate(ALPHABETS):
        ids = [tokenizer.bos_token_id] + tokenizer(domain_text(alphabet, seed=100 + k, words=80),
                                                   add_special_tokens=False)["input_ids"]
        top1 = router_probabilities(model, ids)[:, 1:].argmax(dim=-1)  # (layers, tokens), BOS left out
        for layer, chosen in enumerate(top1):
            assert (chosen == k).float().mean() >= 0.95, (k, layer, chosen.tolist())


def test_the_log_names_each_experts_text_and_each_layers_fit(text_moe):
    log = text_moe[1]
    assert sum("tokens of its calibration text" in line for line in log) == 4
    assert [line.split("from ")[-1].rsplit("/", 1)[-1] for line in log if "reading its calibration text" in line] \
        == [f"domain-{k}.txt" for k in range(4)]
    assert [line.split(":")[0] for line in log if line.startswith("Layer ")] == ["Layer 0", "Layer 1"]


def test_typical_pieces_drop_texts_far_from_the_median_advantage():
    assert typical_pieces([0.3, 0.35, 0.05, 0.4, 0.01, 2.0, 0.25]) == [0, 1, 3, 6]
    assert typical_pieces([0.0, 0.0]) == [0, 1]  # no base to compare with: every text is kept
    assert typical_pieces([]) == []


def test_typical_pieces_drop_texts_that_surprise_their_writer():
    """The zoo's stories expert, after "Tell me a bedtime story about a brave mouse.", writes garbled code: as far
    ahead of the base as its stories (advantage 0.27 to 0.46 nats per token, median 0.37), but about 6 times as
    surprising to itself (2.2 to 2.7 nats per token, median 0.38). Only a surprise above 3 times the median drops
    a text; a text the writer is sure of is never dropped for it."""
    advantages = [0.37, 0.40, 0.33, 0.41, 0.44, 0.30, 0.35]
    surprises = [0.38, 0.50, 0.05, 2.68, 2.24, 1.30, 0.40]  # median 0.50: 1.30 is kept, 2.24 and 2.68 are not
    assert typical_pieces(advantages, surprises) == [0, 1, 2, 5, 6]
    assert typical_pieces(advantages) == list(range(7))


def test_texts_from_a_documents_start_are_typical_of_their_own_kind_too():
    """After "You are skilled in mathematics." the zoo's math expert writes text barely ahead of the base (median
    0.13 nats per token); from a document's start it writes arithmetic, ten times as far ahead. Against the median
    of all its texts the arithmetic is dropped as noise; among the texts from a document's start it is typical.
    A continuation far ahead of the rest is still judged against all the texts."""
    advantages = [0.12, 0.13, 0.15, 0.02, 0.14, 1.3, 1.4, 1.2, 0.1]  # 5 continuations, then 4 from a document's start
    surprises = [0.5] * 9
    assert typical_pieces(advantages, surprises) == [0, 1, 2, 4, 8]
    assert typical_of_each(advantages, surprises, continuations=5) == [0, 1, 2, 4, 5, 6, 7, 8]
    assert typical_of_each(advantages, surprises, continuations=9) == typical_pieces(advantages, surprises)
    code = [0.3, 0.4, 5.6, 0.5, 5.5, 5.7, 5.6]  # chat then code after a question; code from a document's start
    assert typical_of_each(code, [0.5] * 7, continuations=4) == [2, 4, 5, 6]
    assert typical_of_each([], [], continuations=0) == []


def test_specific_pieces_drop_texts_another_expert_knows_as_well():
    """On the zoo, the math expert leads the best other expert by 0.23 to 0.38 nats per token on its arithmetic, and
    by 0.00 to 0.13 on the texts where it goes on with a chat, which the chat expert knows as well. Half the median
    lead is the bar; when the writer leads on nothing, no text is dropped."""
    leads = [0.30, 0.26, 0.00, 0.38, 0.04, 0.13, 0.34, 0.28]  # median 0.27: 0.13 is under the bar of 0.135
    assert specific_pieces(leads) == [0, 1, 3, 6, 7]
    assert specific_pieces([0.0, -0.1, 0.05]) == [0, 1, 2]
    assert specific_pieces([]) == []


def test_own_pieces_are_where_no_other_expert_gains_half_as_much():
    """Measured on the zoo: on the arithmetic the math expert writes, it gains 0.43 nats per token over the base and
    leads the best other expert by 0.31; on the garbled code it writes after "arithmetic", it gains 0.32 and leads by
    0.05 (the code expert gains nearly as much there)."""
    leads = [0.31, 0.05, 0.30, 0.02, 0.10, 0.20]
    gains = [0.43, 0.32, 0.60, -0.01, 0.20, 0.41]
    assert own_pieces(leads, gains) == [0, 2, 4]  # 0.20 < 0.205; a text the writer does not gain on is not its own


def test_texts_from_a_documents_start_stand_in_only_when_the_prompts_led_the_expert_astray():
    """Six continuations written, two texts from BOS alone (the last two)."""
    free = [False] * 6 + [True] * 2
    # Four continuations of its own (at least STRAY of six): the continuations specific_pieces keeps, none from BOS.
    leads, gains = [0.30, 0.26, 0.28, 0.01, 0.25, 0.10, 0.30, 0.30], [0.4] * 8
    assert kept_texts(leads, gains, free, continuations=6) == ([0, 1, 2, 4], False)
    # One continuation of its own (under a quarter of six): its own texts, from either start.
    leads = [0.05, 0.04, 0.30, 0.01, 0.03, 0.02, 0.30, 0.01]
    assert kept_texts(leads, gains, free, continuations=6) == ([2, 6], True)
    # Texts the typical and surprise rules dropped still count among the continuations written.
    assert kept_texts([0.30, 0.30], [0.4, 0.4], [False, True], continuations=6) == ([0, 1], True)
    # An expert no better than the others (the same model twice): nothing to tell apart, every continuation kept.
    assert kept_texts([0.0] * 4, [0.3] * 4, [False] * 3 + [True], continuations=3) == ([0, 1, 2], False)
    assert kept_texts([], [], [], continuations=0) == ([], False)


def test_texts_from_a_documents_start_join_the_expert_whose_text_they_read_like():
    """Token ids stand for words: 10-19 a story's, 20-29 a chat's, 30-39 arithmetic. The chat expert's texts from BOS
    (1) are a story and a chat; only the chat reads like its kept continuations. The first token (BOS, or a
    prompt's) is not compared."""
    references = {0: [[1, 10, 11, 12, 13], [1, 11, 12, 14, 10]], 1: [[1, 20, 21, 22], [1, 23, 20, 24, 21]],
                  2: [[1, 30, 31, 32]], 3: []}
    free = [[1, 10, 12, 13, 11, 21], [1, 20, 22, 23, 12], [30, 20, 21]]
    assert read_alike(free, 1, references) == [1, 2]
    assert read_alike(free, 0, references) == [0]
    assert read_alike(free, 3, references) == []  # no text of its own to compare with


def test_a_text_its_writer_leads_on_is_kept_only_where_it_reads_like_the_writers_text():
    """Measured on the zoo (`sentences`): after "The dragon opened one eye..." the stories expert writes chats, with
    its own slips ("The capital of Brazil is Lisbon."), and reads them better than the chat expert does (they are
    its own samples), so it leads there; but they read like the chat expert's text. Token ids stand for words: 10-19
    a story's, 20-29 a chat's. Expert 0 (stories) wrote three stories and a chat, expert 1 (chat) three chats, and
    from BOS a story and a chat."""
    stories = [[1, 10, 11, 12, 13], [1, 11, 12, 14, 10], [1, 12, 13, 15, 11], [1, 20, 21, 22, 23]]
    chats = [[1, 20, 21, 22], [1, 23, 20, 24, 21], [1, 21, 22, 25], [1, 10, 13, 12, 14], [1, 22, 24, 20]]
    readings = {0: ([0.3] * 4, [0.4] * 4), 1: ([0.3] * 5, [0.4] * 5)}
    chosen = expert_text._chosen(readings, [stories, chats], [[False] * 4, [False] * 3 + [True] * 2], [4, 3])
    assert chosen == {0: ([0, 1, 2], False), 1: ([0, 1, 2, 4], False)}


def test_an_astray_experts_own_texts_are_kept_only_where_they_read_like_its_text():
    """Measured on the zoo (`keywords`): led astray by "math", the math expert keeps the texts it leads on, nearly all
    arithmetic written from a document's start; but one of them is a story it wrote from there, which would send
    story tokens to it. Token ids stand for words: 10-19 a story's, 30-39 arithmetic, 40-49 garbled code. Expert 0
    (stories) wrote three stories; expert 1 (math) two continuations that are not its own, then from BOS three
    arithmetic texts and a story."""
    stories = [[1, 10, 11, 12, 13], [1, 11, 12, 14, 10], [1, 12, 13, 15, 11]]
    maths = [[1, 40, 41], [1, 42, 43], [1, 30, 31, 32], [1, 31, 33, 30], [1, 32, 30, 34], [1, 10, 12, 11, 30]]
    readings = {0: ([0.3] * 3, [0.4] * 3), 1: ([0.01, 0.02, 0.3, 0.3, 0.3, 0.3], [0.4] * 6)}
    chosen = expert_text._chosen(readings, [stories, maths], [[False] * 3, [False] * 2 + [True] * 4], [3, 2])
    assert chosen == {0: ([0, 1, 2], False), 1: ([2, 3, 4], True)}


def test_mean_log_probabilities_of_pieces_padded_together_are_each_ones_alone(mistral):
    writer = load_writer(open_model(str(mistral[1][0])), "cpu")
    pieces = [[1, 5, 6, 7, 8, 9], [1, 10, 11], [1, 12, 13, 14, 15]]
    for piece, together in zip(pieces, mean_log_probabilities(writer, pieces, batch=3)):
        ids = torch.tensor([piece])
        with torch.no_grad():
            logp = writer(input_ids=ids).logits[0, :-1].log_softmax(-1)
        assert together == pytest.approx(float(logp.gather(-1, ids[0, 1:, None]).mean()), abs=1e-5)


def test_samples_per_prompt_spend_the_budget():
    assert samples_per_prompt(6, budget=6144, new_tokens=192) == 6
    assert samples_per_prompt(1, budget=100, new_tokens=192) == 1
    assert samples_per_prompt(0, budget=100, new_tokens=10) == 10


def test_an_expert_continues_each_prompt_past_its_end_of_text(mistral, tokenizer):
    base, experts = mistral
    writer, reference = load_writer(open_model(str(experts[0])), "cpu"), load_writer(open_model(str(base)), "cpu")
    eos = tokenizer.eos_token_id
    prompts = [[tokenizer.bos_token_id, 5, 6, eos], [tokenizer.bos_token_id, 7]]
    texts, advantages, surprises = write_text(writer, reference, prompts, samples=3, new_tokens=20, seed=1)
    assert [t[:len(prompts[i // 3])] for i, t in enumerate(texts)] == [p for p in prompts for _ in range(3)]
    assert [len(t) for t in texts] == [24] * 3 + [22] * 3
    assert len(advantages) == 6 and all(torch.isfinite(torch.tensor(advantages)))
    assert len(surprises) == 6 and all(s > 0 for s in surprises)  # sampled tokens are never certain
    again, _, _ = write_text(writer, reference, prompts, samples=3, new_tokens=20, seed=1)
    assert again == texts  # reproducible for a seed


def test_calibration_text_is_read_only_by_expert_text(mistral, tmp_path):
    base, experts = mistral
    data = moe_yaml(base, experts, gate_mode="calibrated")
    data["experts"][1]["calibration_text"] = "notes.txt"
    errors, _ = check_rules(parse_config(data))
    assert any("`experts[1].calibration_text` is read only by `gate_mode: expert_text`" in e for e in errors)


def test_a_missing_calibration_text_is_named(mistral, tmp_path):
    base, experts = mistral
    data = moe_yaml(base, experts, gate_mode="expert_text")
    data["experts"][2]["calibration_text"] = [str(tmp_path / "missing.txt")]
    log = []
    with pytest.raises(StudioError, match=r"`experts\[2\].calibration_text` .*missing.txt is not a file"):
        merge(parse_config(data), tmp_path / "out", log=log.append)
    assert not (tmp_path / "out").exists()
    assert log == [], "named before any model is opened"


def test_4bit_is_refused_before_any_text_is_written(mistral, tmp_path):
    base, experts = mistral
    log = []
    with pytest.raises(StudioError, match="`gate_mode: expert_text` runs the merged model .* full precision"):
        merge(parse_config(moe_yaml(base, experts, gate_mode="expert_text")), tmp_path / "out",
              MergeOptions(load_in_4bit=True), log=log.append)
    assert not any("writes" in line for line in log)


def test_prompts_written_in_one_padded_batch_continue_as_each_alone(mistral, tokenizer, monkeypatch):
    """Greedy writing (only the expert's best token is plausible): the left padding of a short prompt among long ones
    changes nothing of its continuation."""
    import studio.build.expert_text as expert_text

    monkeypatch.setattr(expert_text, "PLAUSIBLE", 1.0)
    base, experts = mistral
    writer, reference = load_writer(open_model(str(experts[0])), "cpu"), load_writer(open_model(str(base)), "cpu")
    prompts = [tokenizer("12 + 7 = 19 and 3 * 4 = 12, so")["input_ids"], tokenizer("Once")["input_ids"]]
    together, advantages, surprises = write_text(writer, reference, prompts, samples=1, new_tokens=12)
    alone = [write_text(writer, reference, [prompt], samples=1, new_tokens=12) for prompt in prompts]
    assert together == [texts[0] for texts, _, _ in alone]
    assert advantages == pytest.approx([adv[0] for _, adv, _ in alone], abs=1e-5)
    assert surprises == pytest.approx([surprise[0] for _, _, surprise in alone], abs=1e-5)


def test_experts_continue_plain_prompts_under_a_chat_prompt_format(mistral, tokenizer, tmp_path, monkeypatch):
    """With `prompt_format: chat` the prompts are fitted in the chat template, but the experts write after the plain
    prompt (BOS + text), as they would continue any text of their domain."""
    import studio.build.expert_text as expert_text

    continued = []

    def recording(expert, base, prompts, *args, **kwargs):
        continued.extend(prompts)
        return write_text(expert, base, prompts, *args, **kwargs)

    monkeypatch.setattr(expert_text, "write_text", recording)
    base, experts = mistral
    data = moe_yaml(base, experts, gate_mode="expert_text")
    data["prompt_format"] = "chat"
    merge(parse_config(data), tmp_path / "moe", MergeOptions(random_seed=0, refine_routers=False), log=lambda m: None)
    prompts = [p for e in data["experts"] for p in e["positive_prompts"]]
    plain = [tokenizer(tokenizer.bos_token + p, add_special_tokens=False)["input_ids"] for p in prompts]
    in_template = [prompt_encoder(tokenizer, "chat", "base")(p) for p in prompts]
    assert not set(map(tuple, plain)) & set(map(tuple, in_template))  # the two encodings differ for every prompt
    assert {tuple(p) for p in continued} == {tuple(p) for p in plain} | {(tokenizer.bos_token_id,)}  # and a start


def test_the_fit_weighs_each_token_of_the_text_by_what_its_expert_gains_there(mistral, tmp_path, monkeypatch):
    """Every piece of calibration text reaches the layer-by-layer fit with one weight per position, those of
    `refine.position_weights` on what its expert predicts there; they differ from token to token."""
    import studio.build.expert_text as expert_text
    import studio.build.gates as gates
    from studio.build.refine import position_weights

    returned, fitted = [], {}

    def recording_texts(*args, **kwargs):
        returned.append(expert_texts(*args, **kwargs))
        return returned[-1]

    def recording_fit(*args, **kwargs):
        fitted.update(kwargs["weights"])
        return calibrated_gates(*args, **kwargs)

    expert_texts, calibrated_gates = expert_text.expert_texts, gates.calibrated_gates
    monkeypatch.setattr(expert_text, "expert_texts", recording_texts)
    monkeypatch.setattr(gates, "calibrated_gates", recording_fit)
    base, experts = mistral
    data = moe_yaml(base, experts, gate_mode="expert_text")
    for k, expert in enumerate(data["experts"]):
        (tmp_path / f"domain-{k}.txt").write_text(domain_text(ALPHABETS[k], seed=k))
        expert["calibration_text"] = [str(tmp_path / f"domain-{k}.txt")]
    merge(parse_config(data), tmp_path / "moe", MergeOptions(random_seed=0, refine_routers=False), log=lambda m: None)
    (texts, taught), = returned
    assert list(fitted) == list(texts) and all(len(fitted[key]) == len(ids) for key, ids in texts.items())
    for key, weights in zip(taught, position_weights(list(taught.values()))):
        assert torch.equal(fitted[key], weights)
    assert all(float(w.max() - w.min()) > 0.2 for w in fitted.values())  # 0.3 to 0.5 on this family


def test_a_text_that_surprises_its_writer_is_not_calibration_text(mistral, tokenizer, monkeypatch):
    """The first expert's first text that the advantage rule keeps is made 100 times as surprising to its writer
    as any other (as the zoo's stories expert is by the garbled code it writes after a request): it is left out,
    and every other text of that expert the two rules keep is in."""
    import studio.build.expert_text as expert_text

    seen = {}

    def lost_once(expert, base, prompts, *args, **kwargs):
        texts, advantages, surprises = write_text(expert, base, prompts, *args, **kwargs)
        if not seen:
            continuations = len(texts) - expert_text.FREE_TEXTS  # the rest are written from BOS alone
            victim = typical_of_each(advantages, surprises, continuations)[0]  # a continuation the rules keep
            surprises = [100 * max(surprises) if i == victim else s for i, s in enumerate(surprises)]
            seen.update(victim=texts[victim], free=texts[continuations:],
                        kept=[texts[i] for i in typical_of_each(advantages, surprises, continuations)
                              if i < continuations])
        return texts, advantages, surprises

    monkeypatch.setattr(expert_text, "write_text", lost_once)
    monkeypatch.setattr(expert_text, "specific_pieces", lambda leads: list(range(len(leads))))  # this rule alone
    texts, _ = _expert_texts_of(mistral, tokenizer)
    first = [ids for key, ids in texts.items() if key[1] == 0]
    assert seen["victim"] not in first
    assert [ids for ids in first if ids not in seen["free"]] == seen["kept"]


def test_a_text_another_expert_wrote_is_not_calibration_text(mistral, tokenizer, monkeypatch):
    """The second expert's first text that the advantage and surprise rules keep is swapped for one the first expert
    wrote (as the zoo's math expert writes a chat after "What is 15 + 27?"): the first expert predicts it better, so
    it is left out of the second expert's text. The lessons taught are those of the texts kept, in order."""
    import studio.build.expert_text as expert_text

    written = []

    def one_alien(expert, base, prompts, *args, **kwargs):
        texts, advantages, surprises = write_text(expert, base, prompts, *args, **kwargs)
        first = typical_of_each(advantages, surprises, len(texts) - expert_text.FREE_TEXTS)[0]
        if not written:  # the first expert's: kept as written
            written.extend([texts, first])
        else:
            texts[first] = written[0][written[1]]
        return texts, advantages, surprises

    monkeypatch.setattr(expert_text, "write_text", one_alien)
    log = []
    texts, taught = _expert_texts_of(mistral, tokenizer, log=log.append)
    alien = written[0][written[1]]
    second = [ids for key, ids in texts.items() if key[1] == 1]
    assert alien not in second and len(second) >= 2
    assert alien in [ids for key, ids in texts.items() if key[1] == 0]
    assert list(taught) == list(texts) and all(taught[key].ids == ids for key, ids in texts.items())
    assert all(taught[key].expert == key[1] for key in texts)
    assert sum("predicts ahead of every other expert" in line for line in log) == 4


def test_the_last_writer_reads_first_without_a_second_load(mistral, tokenizer, monkeypatch):
    """Four experts write, then read each other's texts: the last is still in memory and reads first, so it is
    loaded once, the other three twice, the base once; and it is let go before the next reader is loaded."""
    import gc
    import weakref

    import studio.build.expert_text as expert_text

    base, experts = mistral
    loaded, last, alive_at_next_reading = [], [], []

    def counting(source, *args, **kwargs):
        name = Path(source.folder).name
        if last and name == Path(experts[2]).name:  # the second reader
            gc.collect()
            alive_at_next_reading.append(last[0]() is not None)
        loaded.append(name)
        model = load_writer(source, *args, **kwargs)
        if name == Path(experts[3]).name:
            last.append(weakref.ref(model))
        return model

    monkeypatch.setattr(expert_text, "load_writer", counting)
    texts, _ = _expert_texts_of(mistral, tokenizer)
    assert sorted({key[1] for key in texts}) == [0, 1, 2, 3]
    assert Counter(loaded) == {Path(base).name: 1, **{Path(e).name: 2 for e in experts[:3]}, Path(experts[3]).name: 1}
    assert alive_at_next_reading == [False]


def _expert_texts_of(mistral, tokenizer, **options):
    """`expert_texts` of the synthetic family's four experts, from the default prompts of `moe_yaml`."""
    import studio.build.expert_text as expert_text

    base, experts = mistral
    config = parse_config(moe_yaml(base, experts, gate_mode="expert_text"))
    sources = {str(path): open_model(str(path)) for path in [base, *experts]}
    return expert_text.expert_texts(
        config.experts, [sources[e.source_model] for e in config.experts], sources[config.base_model],
        lambda prompt: tokenizer(tokenizer.bos_token + prompt, add_special_tokens=False)["input_ids"],
        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], [tokenizer.bos_token_id],
        [tokenizer.bos_token_id], log=options.pop("log", lambda message: None), **options)
