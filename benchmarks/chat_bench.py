"""Chat benchmark: generation speed and memory, bf16 against our 4-bit against transformers' own 4-bit
(`BitsAndBytesConfig`, which leaves fused experts at bf16), router capture on against off.

Models: the bundled zoo merged into a 4-expert Mixtral (assets/examples/zoo-fragments.yml, ~5.5M parameters), a
synthetic ~300M-parameter Mixtral merged from a synthetic Mistral family (studio.build.synthetic.make_family; 4
experts, top 2, hidden 1024, 8 layers; random gates and weights, so it writes random text and never stops
early), and its 8-expert variant (8 experts, top 2, experts half as wide: about as many parameters, a quarter of
them used per token instead of half).

Precisions: bf16 and 4bit through studio.inspect.chat.load_chat_model; bnb4 is transformers' from_pretrained with
BitsAndBytesConfig (NF4, bf16 compute), wrapped in the same ChatModel.

Each (model, precision) runs in a fresh process, which:
  * loads a tiny merged Mixtral first, at the same precision, so that imports and first-use allocations of the
    loading code are not counted as the model's;
  * loads the model on --device and reports its footprint (bytes of weights and
    quantization state), the load's peak RSS above the RSS after imports (the peak counter is reset just
    before loading through /proc/self/clear_refs), and the process's peak RSS over the whole run;
  * generates once untimed (warm-up), then --repeat rounds of one reply with capture off and one with capture
    on, greedy, --tokens new tokens at most, the order alternating each round; the same prompt every time, so
    both settings produce the same tokens. tokens/s = new tokens / wall time of `reply` (prompt, generation and,
    with capture, the last token's routing step and the trace); the table shows the median over rounds.
Capture cost = the median over rounds of 1 - (tokens/s with capture) / (tokens/s without), each round's two
replies side by side, so that slow drifts of the machine cancel out.

Usage: python benchmarks/chat_bench.py [--tokens 64] [--repeat 7] [--precisions bf16,4bit,bnb4]
       [--models zoo,synthetic,synthetic8] [--device cpu|cuda] [--threads N] [--workdir DIR] [--keep] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# raw text: BOS + text, no template
PROMPTS = {"zoo": "Once upon a time", "synthetic": "Tell me a story.", "synthetic8": "Tell me a story."}
# Experts hold ~93% of the weights, as in real MoEs (Mixtral 8x7B: 96%); the vocabulary is the synthetic
# tokenizer's. Embeddings and the output layer stay at bf16 in 4-bit (transformers' default), so a model where
# they weigh more has a higher 4-bit ratio.
SYNTHETIC_SHAPE = {"hidden": 1024, "intermediate": 2816, "layers": 8, "heads": 16, "kv_heads": 4}
# model -> (expert count, dense shape); the merge keeps 2 experts per token (mergekit's default)
FAMILIES = {"primer": (4, {"hidden": 64, "intermediate": 128, "layers": 2}),
            "synthetic": (4, SYNTHETIC_SHAPE),
            "synthetic8": (8, {**SYNTHETIC_SHAPE, "intermediate": SYNTHETIC_SHAPE["intermediate"] // 2})}

CHILD = r"""
import gc, json, statistics, sys, time
job = json.loads(sys.argv[1])
import torch
if job["threads"]:
    torch.set_num_threads(job["threads"])
from studio.inspect.chat import ChatModel, ChatSettings, load_chat_model

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

def load(path, precision, device):
    if precision != "bnb4":
        return load_chat_model(path, precision, device)
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from studio.inspect.quantize import footprint
    from studio.inspect.routing import expert_count, expert_labels
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device,
                                                 quantization_config=quantization).eval()
    labels = expert_labels(path, expert_count(model.config))
    return ChatModel(model, AutoTokenizer.from_pretrained(path), path, precision, labels, footprint(model))

load(job["primer"], job["precision"], job["device"])
gc.collect()
import_peak, before = status("VmHWM"), status("VmRSS")
try:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
except OSError:  # a kernel that does not let a process reset its peak: the load peak counts from the start
    pass
start = time.perf_counter()
chat = load(job["model"], job["precision"], job["device"])
load_seconds, load_peak = time.perf_counter() - start, status("VmHWM") - before
prompt = job["prompt"]
chat.reply(prompt, ChatSettings(temperature=0, max_new_tokens=8))
settings = ChatSettings(temperature=0, max_new_tokens=job["tokens"])
rates, tokens = {"off": [], "on": []}, set()
for round in range(job["repeat"]):
    for capture in ((False, True) if round % 2 == 0 else (True, False)):
        start = time.perf_counter()
        reply = chat.reply(prompt, settings, capture=capture)
        rates["on" if capture else "off"].append(reply.new_tokens / (time.perf_counter() - start))
        tokens.add(reply.new_tokens)
cost = statistics.median(1 - on / off for on, off in zip(rates["on"], rates["off"]))
print(json.dumps({"footprint": chat.footprint, "load_seconds": load_seconds, "load_peak": load_peak,
                  "peak": max(import_peak, status("VmHWM")), "tokens": sorted(tokens), "threads": torch.get_num_threads(),
                  "off": statistics.median(rates["off"]), "on": statistics.median(rates["on"]), "cost": cost}))
"""


def build_models(root: Path, names: list[str]) -> dict[str, Path]:
    """The primer and the named models (zoo, synthetic, synthetic8), built under `root` (each only once)."""
    from studio.config import load_config

    models = {name: root / name for name in ["primer", *names]}
    for name, path in models.items():
        if path.exists():
            continue
        if name == "zoo":
            cwd = os.getcwd()
            os.chdir(REPO)  # the example config's paths are relative to the project folder
            try:
                _merge(load_config(REPO / "assets/examples/zoo-fragments.yml"), path)
            finally:
                os.chdir(cwd)
        else:
            _merge_family(root / f"{name}-family", path, *FAMILIES[name])
    return models


def _merge_family(family: Path, out: Path, experts: int, shape: dict) -> None:
    from studio.build.synthetic import make_family
    from studio.config import parse_config

    base, fine_tunes = make_family(family, experts, **shape)
    _merge(parse_config({"base_model": str(base), "gate_mode": "random", "dtype": "bfloat16",
                         "experts": [{"source_model": str(e)} for e in fine_tunes]}), out)
    shutil.rmtree(family)


def _merge(config, out: Path) -> None:
    from studio.build.merge import MergeOptions, merge

    merge(config, out, MergeOptions(random_seed=0), log=lambda m: None)


def run(model: "Model", primer: Path, precision: str, args: argparse.Namespace) -> dict:
    job = {"model": str(model.path), "primer": str(primer), "precision": precision, "device": args.device,
           "prompt": PROMPTS[model.name], "tokens": args.tokens, "repeat": args.repeat, "threads": args.threads}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"},
                          timeout=getattr(args, "timeout", None))
    if proc.returncode != 0:
        raise SystemExit(f"{model.name} at {precision} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    parameters: int
    experts: str  # "4 / top 2"
    layer_bytes: int  # one layer's experts at bf16: the "one layer" of the loading bound

    @classmethod
    def at(cls, name: str, path: Path) -> "Model":
        from transformers import AutoConfig

        from studio.inspect.quantize import layer_expert_bytes
        from studio.inspect.routing import expert_count
        from studio.sources import open_model

        source = open_model(str(path))
        config = AutoConfig.from_pretrained(path)
        count = sum(info.nbytes // info.dtype.itemsize for info in source.tensors.values())
        return cls(name, path, count, f"{expert_count(config)} / top {config.num_experts_per_tok}",
                   layer_expert_bytes(source))


def table(results: dict[tuple[Model, str], dict]) -> str:
    """One row per (model, precision); each ratio against the same model's bf16 row of this run."""
    from studio.formatting import format_table, human_bytes, human_count

    headers = ["model", "params", "experts", "precision", "footprint", "vs bf16", "load s", "load peak", "bound",
               "peak RSS", "new tokens", "tok/s off", "vs bf16", "tok/s on", "capture cost"]
    rows = []
    for (model, precision), r in results.items():
        bf16 = results.get((model, "bf16"), r)
        rows.append([model.name, human_count(model.parameters), model.experts, precision,
                     human_bytes(r["footprint"]), f"{r['footprint'] / bf16['footprint']:.2f}",
                     f"{r['load_seconds']:.1f}", human_bytes(r["load_peak"]),
                     human_bytes(1.5 * r["footprint"] + model.layer_bytes), human_bytes(r["peak"]),
                     "/".join(map(str, r["tokens"])), f"{r['off']:.1f}", f"{r['off'] / bf16['off']:.2f}",
                     f"{r['on']:.1f}", f"{r['cost']:+.1%}"])
    return format_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per reply (default 64)")
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds of capture off + on (default 7)")
    parser.add_argument("--precisions", default="bf16,4bit,bnb4",
                        help="comma-separated: bf16, 4bit (ours), bnb4 (transformers + BitsAndBytesConfig)")
    parser.add_argument("--models", default="zoo,synthetic,synthetic8",
                        help="comma-separated: zoo, synthetic, synthetic8")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the models run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (default: torch's)")
    parser.add_argument("--workdir", type=Path, help="where models are built (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the built models")
    parser.add_argument("--json", type=Path, help="also write the results there, one object per row")
    args = parser.parse_args()

    root = args.workdir or Path(tempfile.mkdtemp(prefix="chat-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        paths = build_models(root, args.models.split(","))
        primer = paths.pop("primer")
        models = [Model.at(name, path) for name, path in paths.items()]
        results = {(model, precision): run(model, primer, precision, args)
                   for model in models for precision in args.precisions.split(",")}
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    threads = sorted({r["threads"] for r in results.values()})
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads}, "
          f"device {args.device}; greedy, up to {args.tokens} new tokens, median of {args.repeat} rounds")
    print("load peak: RSS above the post-import RSS while loading; bound: 1.5 x footprint + one layer's experts "
          "(bf16)\n")
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps([{"model": model.name, "precision": precision, **r}
                                         for (model, precision), r in results.items()], indent=1))


if __name__ == "__main__":
    main()
