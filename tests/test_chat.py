"""Chat with an MoE in 4-bit: the experts are quantized too, loading stays within its memory bound, answers
stream, and the routing of every prompt and answer token is recorded.

Models: the bundled zoo merged into a Mixtral (trained weights), and tiny random Mixtral, Qwen2-MoE and
Qwen3-MoE models (tests/conftest.py builds them).
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from bitsandbytes.nn import Linear4bit

from studio.app.cli import main
from studio.build.synthetic import make_family
from studio.errors import StudioError
from studio.inspect.chat import ChatSettings, StopFilter, cut_at_stop, load_chat_model
from studio.inspect.quantize import quantize_int8, quantize_nf4, slice_size
from studio.trace import RouterTrace

from helpers import FAMILIES, ROOT, TEXT, expert_modules, plain_forward_probabilities, random_moe, tf4_python

pytestmark = pytest.mark.usefixtures("single_thread")
GREEDY = ChatSettings(temperature=0, max_new_tokens=16)
STORY = [{"role": "user", "content": "Once upon a time"}]


@pytest.fixture(scope="module")
def zoo_4bit(zoo_moe):
    return load_chat_model(zoo_moe, "4bit", "cpu")


def logits(chat, text: str = TEXT) -> torch.Tensor:
    with torch.no_grad():
        return chat.model(input_ids=torch.tensor([chat.encode(text)])).logits.float()[0]


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return ((approx - exact).norm() / exact.norm()).item()


def test_4bit_quantizes_the_experts_of_the_zoo_moe(zoo_4bit, zoo_bf16):
    experts = expert_modules(zoo_4bit.model)
    assert len(experts) == 4
    for module in experts:
        for name in ("gate_up_proj", "down_proj"):
            assert module.parametrizations[name].original.dtype == torch.uint8
    assert all(isinstance(layer.self_attn.q_proj, Linear4bit) for layer in zoo_4bit.model.model.layers)
    assert zoo_4bit.footprint <= 0.35 * zoo_bf16.footprint
    assert zoo_4bit.labels == [f"assets/zoo/{name}" for name in ("code", "math", "stories", "chat")]
    assert "in memory at 4bit" in zoo_4bit.describe()


def test_4bit_logits_stay_close_to_bf16_on_the_zoo_moe(zoo_4bit, zoo_bf16):
    exact, approx = logits(zoo_bf16), logits(zoo_4bit)
    assert relative_error(approx, exact) < 0.1
    assert (approx.argmax(-1) == exact.argmax(-1)).float().mean() >= 0.85
    kl = (exact.softmax(-1) * (exact.log_softmax(-1) - approx.log_softmax(-1))).sum(-1).mean()
    assert kl < 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_4bit_footprint_and_logits_on_tiny_moes(tiny_moes, family):
    bf16, nf4 = (load_chat_model(tiny_moes[family], precision, "cpu") for precision in ("bf16", "4bit"))
    layers = len(FAMILIES[family][2])
    assert len(expert_modules(nf4.model)) == layers
    assert nf4.footprint <= 0.35 * bf16.footprint
    assert relative_error(logits(nf4, "def add(a, b): return a + b"), logits(bf16, "def add(a, b): return a + b")) < 0.25
    if family == "qwen2_moe":  # the shared expert is quantized by bitsandbytes; its one-output gate stays as is
        mlp = nf4.model.model.layers[0].mlp
        assert isinstance(mlp.shared_expert.up_proj, Linear4bit)
        assert type(mlp.shared_expert_gate) is torch.nn.Linear


def test_8bit_quantizes_the_experts_to_int8(zoo_moe, zoo_bf16):
    int8 = load_chat_model(zoo_moe, "8bit", "cpu")
    for module in expert_modules(int8.model):
        assert module.parametrizations["down_proj"].original.dtype == torch.int8
    assert int8.footprint <= 0.6 * zoo_bf16.footprint
    exact, approx = logits(zoo_bf16), logits(int8)
    per_token = (approx - exact).norm(dim=-1) / exact.norm(dim=-1)
    # A token whose router is near a tie changes experts under any perturbation (two of 42 here); every other
    # token must be as close as int8 weights allow.
    assert per_token.median() < 0.02 and (per_token < 0.06).float().mean() >= 0.9, per_token


def test_sliced_nf4_equals_bitsandbytes_in_one_go():
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    weight = torch.randn(4, 512, 600, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert weight.numel() // slice_size(weight.numel()) >= 16 and weight.numel() % slice_size(weight.numel())
    # (several slices, the last one partial)
    data, dequantize = quantize_nf4(weight, "gate_up_proj")
    whole, state = quantize_4bit(weight, quant_type="nf4")
    assert torch.equal(data, whole) and torch.equal(dequantize.quant_state.absmax, state.absmax)
    experts = torch.stack([dequantize.dequantize(data, e) for e in range(len(weight))])
    assert torch.equal(experts, dequantize_4bit(whole, state))
    int8, rows = quantize_int8(weight, "down_proj")
    experts = torch.stack([rows.dequantize(int8, e) for e in range(len(weight))]).float()
    assert (experts - weight.float()).abs().max() <= weight.float().abs().amax(dim=-1, keepdim=True).max() / 127


# Runs in a fresh process: loads a small model of the same family first (imports, first-use allocations),
# then measures the peak resident memory of loading the large one in 4-bit.
RSS_SCRIPT = r"""
import json, sys
from studio.inspect.chat import load_chat_model
from studio.inspect.quantize import layer_expert_bytes
from studio.sources import open_model

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

load_chat_model(sys.argv[1], "4bit", "cpu")
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) restarts from the current RSS
model = load_chat_model(sys.argv[2], "4bit", "cpu")
print(json.dumps({"before": before, "peak": status("VmHWM"), "footprint": model.footprint,
                  "layer": layer_expert_bytes(open_model(sys.argv[2]))}))
"""


def loading_peak(primer: Path, model: Path, runs: int = 1) -> dict:
    """Loads `primer`, then `model`, in 4-bit in a fresh process: RSS before, peak, footprint, one layer's experts.
    With several `runs`, the run whose peak rose least: the allocator's noise only ever adds to a peak."""
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    measured = []
    for _ in range(runs):
        proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(primer), str(model)], capture_output=True,
                              text=True, cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 0, proc.stderr[-3000:]
        measured.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return min(measured, key=lambda m: m["peak"] - m["before"])


def test_loading_in_4bit_never_holds_the_full_precision_model(tmp_path, tiny_moes, tokenizer):
    big = random_moe(tmp_path / "big", "mixtral", tokenizer=tokenizer, hidden_size=512, intermediate_size=1024,
                     num_local_experts=8, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                     vocab_size=1024)
    m = loading_peak(tiny_moes["mixtral"], big)
    bf16_bytes = sum(f.stat().st_size for f in big.glob("*.safetensors"))
    assert m["footprint"] <= 0.35 * bf16_bytes
    assert m["peak"] - m["before"] <= 1.5 * m["footprint"] + m["layer"], m


def test_loading_the_zoo_moe_in_4bit_stays_within_its_bound(tiny_moes, zoo_moe):
    """A 5.5M-parameter model: the quantizer's scratch must shrink with the tensors, or it alone breaks the bound.
    The margin is under 1 MB of RSS (6.5 to 7.0 MB measured against a bound of 7.65 MB; 7.9 MB before the scratch
    shrank), so one process in many crossed it by allocator noise alone: the lower of two runs is measured."""
    m = loading_peak(tiny_moes["mixtral"], zoo_moe, runs=2)
    assert m["peak"] - m["before"] <= 1.5 * m["footprint"] + m["layer"], m


# Runs under transformers 4.x (.venv-tf4), where experts are nn.Linear modules that bitsandbytes quantizes itself.
TF4_CHAT = r"""
import json, sys
from studio.inspect.chat import ChatSettings, load_chat_model

chat = load_chat_model(sys.argv[1], "4bit", "cpu")
reply = chat.reply("Once upon a time", ChatSettings(temperature=0, max_new_tokens=6))
experts = [type(m).__name__ for name, m in chat.model.named_modules() if ".experts." in name and name.endswith(".w1")]
print(json.dumps({"experts": sorted(set(experts)), "count": len(experts), "layers": reply.trace.layers,
                  "shape": list(reply.trace.probabilities.shape), "prompt": reply.trace.prompt_length,
                  "new": reply.new_tokens}))
"""


def test_chat_in_4bit_under_transformers_4(tiny_moes):
    proc = subprocess.run([str(tf4_python()), "-c", TF4_CHAT, str(tiny_moes["mixtral"])], capture_output=True,
                          text=True, cwd=ROOT, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["experts"] == ["Linear4bit"] and result["count"] == 3 * 4
    assert result["layers"] == [0, 1, 2] and result["shape"] == [3, result["prompt"] + result["new"], 4]


def test_greedy_streaming_gives_the_same_text_as_a_whole_reply(zoo_4bit):
    reply = zoo_4bit.reply(STORY, GREEDY)
    pieces = list(zoo_4bit.stream(STORY, GREEDY))
    assert isinstance(pieces[-1], RouterTrace) and all(isinstance(p, str) for p in pieces[:-1])
    assert "".join(pieces[:-1]) == reply.text and len(pieces) > 2
    assert pieces[-1].token_ids == reply.trace.token_ids
    assert torch.equal(pieces[-1].probabilities, reply.trace.probabilities)


def test_trace_covers_every_prompt_and_answer_token(tiny_moes):
    chat = load_chat_model(tiny_moes["qwen2_moe"], "fp32", "cpu")
    settings = ChatSettings(temperature=0, max_new_tokens=12, system_prompt="Be brief.")
    reply = chat.reply([{"role": "user", "content": "Hello"}], settings)
    trace, prompt = reply.trace, chat.encode([{"role": "user", "content": "Hello"}], "Be brief.")
    assert trace.prompt_length == len(prompt) and trace.token_ids[:len(prompt)] == prompt
    assert len(trace.token_ids) == len(prompt) + reply.new_tokens == len(trace.tokens)
    assert "".join(trace.tokens) == chat.tokenizer.decode(trace.token_ids)
    assert trace.layers == [0, 2] and trace.probabilities.shape == (2, len(trace.tokens), 4)
    # Generation reuses the cache token by token; the plain forward sees the whole sequence at once.
    torch.testing.assert_close(trace.probabilities, plain_forward_probabilities(chat.model, trace.token_ids),
                               atol=1e-5, rtol=1e-4)


def test_capture_off_gives_the_same_answer_and_no_trace(zoo_4bit):
    on, off = zoo_4bit.reply(STORY, GREEDY), zoo_4bit.reply(STORY, GREEDY, capture=False)
    assert off.trace is None and off.text == on.text
    assert not any(isinstance(p, RouterTrace) for p in zoo_4bit.stream(STORY, GREEDY, capture=False))


def test_stop_strings_end_the_answer_streamed_or_not(zoo_bf16):
    full = zoo_bf16.reply(STORY, ChatSettings(temperature=0, max_new_tokens=24)).text
    stop = full.split()[2]
    settings = ChatSettings(temperature=0, max_new_tokens=24, stop=(stop,))
    cut = zoo_bf16.reply(STORY, settings)
    assert cut.text == full[:full.index(stop)]
    assert "".join(p for p in zoo_bf16.stream(STORY, settings) if isinstance(p, str)) == cut.text


def test_stop_filter_holds_back_what_could_start_a_stop():
    stop = StopFilter(("\nUser:",))
    assert [stop.feed("Hi"), stop.feed(" there\nUs"), stop.feed("ual"), stop.feed("\nUser: more"), stop.feed("x")] \
        == ["Hi", " there", "\nUsual", "", ""]
    assert stop.finish() == ""
    assert cut_at_stop("a STOP b END", ("END", "STOP")) == "a "


def test_sampling_follows_the_seed(zoo_bf16):
    settings = ChatSettings(temperature=1.0, top_p=0.9, top_k=20, repetition_penalty=1.1, max_new_tokens=12, seed=3)
    assert zoo_bf16.reply(STORY, settings, capture=False).text == zoo_bf16.reply(STORY, settings, capture=False).text


def test_closing_a_stream_stops_generation(zoo_bf16, monkeypatch):
    monkeypatch.setattr(zoo_bf16.model.generation_config, "eos_token_id", None)  # only max_new_tokens ends it
    steps = []
    monkeypatch.setattr(zoo_bf16.model, "forward", _counting(zoo_bf16.model.forward, steps))
    stream = zoo_bf16.stream("Once upon a time", ChatSettings(temperature=0, max_new_tokens=400))
    next(stream)
    stream.close()
    deadline = time.time() + 30
    while any(t.name == "studio-chat" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "studio-chat" for t in threading.enumerate())
    assert 1 < len(steps) < 100


def _counting(forward, steps: list):
    def counted(*args, **kwargs):
        steps.append(1)
        return forward(*args, **kwargs)

    return counted


def test_chat_template_system_prompt_and_fallback(zoo_bf16):
    tokenizer = zoo_bf16.tokenizer
    ids = zoo_bf16.encode(STORY, "Be kind.")
    assert tokenizer.decode(ids) == "<|system|>\nBe kind.</s>\n<|user|>\nOnce upon a time</s>\n<|assistant|>\n"
    parts = [{"role": "user", "content": [{"type": "text", "text": "Once upon "}, {"type": "text", "text": "a time"}]}]
    assert zoo_bf16.encode(parts) == zoo_bf16.encode(STORY)
    assert tokenizer.decode(zoo_bf16.encode("12 + 7 =")) == "<s>12 + 7 ="
    original = tokenizer.chat_template
    try:  # a template without a system role (like Mistral's): the system prompt joins the first user message
        tokenizer.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
                                   "{% endif %}{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
        assert tokenizer.decode(zoo_bf16.encode(STORY, "Be kind.")) == "[Be kind.\n\nOnce upon a time]"
    finally:
        tokenizer.chat_template = original


def test_a_tokenizer_without_chat_template_gets_the_fallback(tiny_moes, tmp_path):
    folder = tmp_path / "no-template"
    folder.mkdir()
    for path in tiny_moes["mixtral"].iterdir():
        if path.name != "chat_template.jinja":
            (folder / path.name).write_bytes(path.read_bytes())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    chat = load_chat_model(folder, "bf16", "cpu")
    assert chat.tokenizer.decode(chat.encode(STORY, "Be kind.")) == \
        "<s>System: Be kind.\nUser: Once upon a time\nAssistant:"
    assert chat.stop == ("\nUser:",)


def test_user_errors_are_clear(zoo_moe, tmp_path, tokenizer):
    with pytest.raises(StudioError, match="Unknown precision '3bit'; choose one of 4bit, 8bit, bf16, fp32"):
        load_chat_model(zoo_moe, "3bit")
    with pytest.raises(StudioError, match="Unknown device 'tpu'"):
        load_chat_model(zoo_moe, "bf16", "tpu")
    if not torch.cuda.is_available():
        with pytest.raises(StudioError, match="--device cuda: no CUDA device is available here"):
            load_chat_model(zoo_moe, "bf16", "cuda")
    with pytest.raises(StudioError, match="folder .* does not exist"):
        load_chat_model(tmp_path / "missing")
    base, _ = make_family(tmp_path / "dense", 1, tokenizer=tokenizer)
    with pytest.raises(StudioError, match="not a Mixture-of-Experts model"):
        load_chat_model(base, "bf16", "cpu")
    with pytest.raises(StudioError, match="temperature is -1"):
        ChatSettings(temperature=-1)
    with pytest.raises(StudioError, match="top_p is 0"):
        ChatSettings(top_p=0)


def test_cli_chat_prints_a_routing_line_after_each_reply(zoo_moe, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Once upon a time\n/reset\n12 + 7 =\n"))
    assert main(["chat", str(zoo_moe), "--precision", "bf16", "--device", "cpu", "--temperature", "0",
                 "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("[L0 ")]
    assert len(lines) == 2
    assert all(len(line.split("  ")) == 4 for line in lines)
    assert all(any(name in line for name in ("code", "math", "stories", "chat")) for line in lines)


def test_cli_chat_raw_continues_each_line_as_text(zoo_moe, zoo_bf16, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("def parse(line):\n12 + 7 =\n"))
    assert main(["chat", str(zoo_moe), "--raw", "--precision", "bf16", "--device", "cpu", "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    greedy = ChatSettings(temperature=0, max_new_tokens=12)
    code, number = (zoo_bf16.reply(text, greedy).text for text in ("def parse(line):", "12 + 7 ="))
    assert code.startswith("\n    ") and code != zoo_bf16.reply([{"role": "user", "content": "def parse(line):"}],
                                                                  greedy).text
    assert f"model> {code}\n[L0 " in out and f"model> {number}\n[L0 " in out  # each line alone, no history


def test_cli_chat_without_flags_answers_as_the_models_generation_config_says(zoo_moe, zoo_bf16, monkeypatch,
                                                                            capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("12 + 7 =\n"))
    assert main(["chat", str(zoo_moe), "--raw", "--precision", "bf16", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "Generation settings from the model's generation_config.json" in captured.err
    assert (zoo_bf16.defaults.temperature, zoo_bf16.defaults.max_new_tokens) == (0.0, 32)  # the zoo: greedy, 32
    answer = zoo_bf16.reply("12 + 7 =", zoo_bf16.defaults).text
    assert f"model> {answer}\n[L0 " in captured.out


def test_cli_route_prints_the_table_and_writes_figures(zoo_moe, tmp_path, capsys):
    html, trace_json, trace_csv = tmp_path / "r.html", tmp_path / "t.json", tmp_path / "t.csv"
    assert main(["route", str(zoo_moe), "12 + 7 =", "--raw", "--precision", "bf16", "--device", "cpu",
                 "--max-new-tokens", "6", "--layer", "2", "--html", str(html), "--json", str(trace_json),
                 "--csv", str(trace_csv)]) == 0
    out = capsys.readouterr().out
    trace = RouterTrace.load(trace_json)
    assert "#   part    token" in out and "L0      L1      L2      L3" in out
    for t, token in enumerate(trace.tokens):
        cells = [f"{int(e)} {float(p):.2f}" for e, p in zip(trace.top1()[:, t], trace.probabilities[:, t].amax(-1))]
        assert f"{t:<2}  {trace.part_of(t):<6}  {token!r}" in out and "  ".join(cells) in out
    assert "plotly" in html.read_text()
    assert len(list(csv.reader(io.StringIO(trace_csv.read_text())))) == 1 + 4 * len(trace.tokens)
    assert main(["route", str(zoo_moe), "x", "--precision", "3bit"]) == 2
    assert "Unknown precision '3bit'" in capsys.readouterr().err
