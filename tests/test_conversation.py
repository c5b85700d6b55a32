"""A chat as the Chat tab holds it: messages typed while an answer streams are queued and answered in turn,
Stop ends an answer at the next token with its text and routing kept, the routing grows while the answer
streams, and each model's own generation_config.json gives its default settings."""

from __future__ import annotations

import json
import threading

import pytest
import torch

from studio.errors import StudioError
from studio.inspect.chat import generation_defaults
from studio.inspect.settings import ChatSettings
from studio.inspect.conversation import Conversation
from studio.trace import RouterTrace

pytestmark = pytest.mark.usefixtures("single_thread")
GREEDY = ChatSettings(temperature=0, max_new_tokens=12)


def test_the_zoo_answers_greedy_and_short_by_default(zoo_bf16):
    assert zoo_bf16.defaults == ChatSettings(temperature=0, top_k=0, max_new_tokens=32)
    assert zoo_bf16.defaults.describe() == "greedy, at most 32 new tokens"
    assert zoo_bf16.defaults_from == "the model's generation_config.json"
    assert zoo_bf16.moe_layers() == [0, 1, 2, 3]


def test_generation_defaults_follow_generation_config_json(tmp_path):
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9, "max_new_tokens": 512, "repetition_penalty": 1.1}))
    settings, origin = generation_defaults(tmp_path)
    assert settings == ChatSettings(temperature=0.6, top_p=0.9, top_k=0, max_new_tokens=512, repetition_penalty=1.1)
    assert settings.describe() == ("sampling at temperature 0.6, top-p 0.9, top-k 0, repetition penalty 1.1, "
                                   "at most 512 new tokens")
    assert origin == "the model's generation_config.json"
    (tmp_path / "generation_config.json").unlink()
    assert generation_defaults(tmp_path) == (ChatSettings(), "the studio's defaults (the model has no "
                                                             "generation_config.json)")
    (tmp_path / "generation_config.json").write_text("{")
    with pytest.raises(StudioError, match="generation_config.json cannot be read .*; fix or delete it"):
        generation_defaults(tmp_path)


def test_the_routing_grows_while_the_answer_streams(zoo_bf16):
    pieces = list(zoo_bf16.stream("Once upon a time", GREEDY, live_every=4))
    traces = [p for p in pieces if isinstance(p, RouterTrace)]
    *live, final = traces
    prompt = final.prompt_length
    assert [len(t.tokens) - prompt for t in live] == [4, 8]  # the 12th token is routed only by the last step
    for partial in live:  # each is the start of the final trace, exactly
        n = len(partial.tokens)
        assert partial.token_ids == final.token_ids[:n] and partial.tokens == final.tokens[:n]
        assert torch.equal(partial.probabilities, final.probabilities[:, :n])
    assert "".join(p for p in pieces if isinstance(p, str)) == zoo_bf16.reply("Once upon a time", GREEDY).text


def test_messages_typed_while_answering_are_queued_and_answered_in_turn(zoo_bf16):
    conversation = Conversation()
    assert conversation.submit("Hello") == "Sent."
    updates = conversation.answer_waiting(zoo_bf16, GREEDY)
    first = next(updates)
    assert first.messages[0] == {"role": "user", "content": "Hello"}
    assert conversation.submit("What is 12 + 7?").startswith("Queued: answered when the current reply ends (1 waiting)")
    waiting = next(updates)
    assert waiting.messages[-1] == {"role": "user", "content": "What is 12 + 7?"}  # shown while it waits
    assert waiting.status.endswith("Queued: 1 message, answered when the current reply ends.")
    *_, last = updates
    assert last.final and last.status == "Answer: 12 tokens."
    asked = [m["content"] for m in last.messages if m["role"] == "user"]
    assert asked == ["Hello", "What is 12 + 7?"] and [m["role"] for m in last.messages] == ["user", "assistant"] * 2
    history = last.messages[:3]  # the second answer saw the first exchange, as a chat does
    assert last.messages[3]["content"] == zoo_bf16.reply(history, GREEDY).text
    assert not conversation.answering and not conversation.waiting


def test_stop_ends_the_answer_at_the_next_token_and_keeps_it(zoo_bf16):
    conversation = Conversation()
    conversation.submit("Once upon a time", raw=True)
    long = ChatSettings(temperature=0, max_new_tokens=400)
    updates = conversation.answer_waiting(zoo_bf16, long, live_every=4)
    for update in updates:
        if update.trace is not None:  # four tokens are out: press Stop
            conversation.stop.set()
            break
    *_, last = updates
    tokens = len(last.trace.tokens) - last.trace.prompt_length
    assert last.final and last.status == f"Stopped after {tokens} tokens." and 4 < tokens < 12
    assert last.messages[-1]["content"] == zoo_bf16.tokenizer.decode(last.trace.token_ids[last.trace.prompt_length:],
                                                                       skip_special_tokens=True)
    conversation.submit("Once upon a time", raw=True)  # the next message is answered in full again
    *_, again = conversation.answer_waiting(zoo_bf16, GREEDY)
    assert again.status == "Answer: 12 tokens."


def test_clear_forgets_the_conversation_and_stops_the_answer(zoo_bf16):
    conversation = Conversation()
    conversation.submit("Once upon a time", raw=True)
    conversation.submit("And then?", raw=True)
    updates = conversation.answer_waiting(zoo_bf16, ChatSettings(temperature=0, max_new_tokens=400))
    next(updates)
    threading.Thread(target=conversation.clear).start()
    *_, last = updates
    assert last.status.startswith("Stopped after") and conversation.shown() == []


def test_route_gives_a_texts_own_routing_without_an_answer(zoo_bf16):
    trace = zoo_bf16.route("12 + 7 =")
    generated = zoo_bf16.reply("12 + 7 =", ChatSettings(temperature=0, max_new_tokens=1)).trace
    n = generated.prompt_length
    assert trace.prompt_length == len(trace.tokens) == n and trace.token_ids == generated.token_ids[:n]
    assert torch.allclose(trace.probabilities, generated.probabilities[:, :n], atol=1e-4)
