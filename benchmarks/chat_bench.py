"""Chat benchmark: generation speed and memory, bf16 against 4-bit, router capture on against off.

Models: the bundled zoo merged into a 4-expert Mixtral (assets/examples/zoo-fragments.yml, ~5.5M parameters), and a
synthetic ~300M-parameter Mixtral merged from a synthetic Mistral family (studio.synthetic.make_family; 4
experts, hidden 1024, 8 layers; random gates and weights, so it writes random text and never stops early).

Each (model, precision) runs in a fresh process, which:
  * loads a tiny merged Mixtral first, at the same precision, so that imports and first-use allocations of the
    loading code are not counted as the model's;
  * loads the model with studio.chat.load_chat_model on the CPU and reports its footprint (bytes of weights and
    quantization state), the load's peak RSS above the RSS after imports (the peak counter is reset just
    before loading through /proc/self/clear_refs), and the process's peak RSS over the whole run;
  * generates once untimed (warm-up), then --repeat rounds of one reply with capture off and one with capture
    on, greedy, --tokens new tokens at most, the order alternating each round; the same prompt every time, so
    both settings produce the same tokens. tokens/s = new tokens / wall time of `reply` (prompt, generation and,
    with capture, the last token's routing step and the trace); the table shows the median over rounds.
Capture cost = the median over rounds of 1 - (tokens/s with capture) / (tokens/s without), each round's two
replies side by side, so that slow drifts of the machine cancel out.

Usage: python benchmarks/chat_bench.py [--tokens 64] [--repeat 7] [--precisions bf16,4bit]
       [--models zoo,synthetic] [--threads N] [--workdir DIR] [--keep]
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
PROMPTS = {"zoo": "Once upon a time", "synthetic": "Tell me a story."}  # raw text: BOS + text, no template
# Experts hold ~93% of the weights, as in real MoEs (Mixtral 8x7B: 96%); the vocabulary is the synthetic
# tokenizer's. Embeddings and the output layer stay at bf16 in 4-bit (transformers' default), so a model where
# they weigh more has a higher 4-bit ratio.
SYNTHETIC_SHAPE = {"hidden": 1024, "intermediate": 2816, "layers": 8, "heads": 16, "kv_heads": 4}

CHILD = r"""
import gc, json, statistics, sys, time
job = json.loads(sys.argv[1])
import torch
if job["threads"]:
    torch.set_num_threads(job["threads"])
from studio.chat import ChatSettings, load_chat_model

def status(key):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(key + ":"))

load_chat_model(job["primer"], job["precision"], "cpu")
gc.collect()
import_peak, before = status("VmHWM"), status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
start = time.perf_counter()
chat = load_chat_model(job["model"], job["precision"], "cpu")
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
    """The primer, the merged zoo and the synthetic 300M MoE, built under `root` (each only once)."""
    from studio.config import load_config

    shapes = {"primer": {"hidden": 64, "intermediate": 128, "layers": 2}, "synthetic": SYNTHETIC_SHAPE}
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
            _merge_family(root / f"{name}-family", path, shapes[name])
    return models


def _merge_family(family: Path, out: Path, shape: dict) -> None:
    from studio.config import parse_config
    from studio.synthetic import make_family

    base, experts = make_family(family, 4, **shape)
    _merge(parse_config({"base_model": str(base), "gate_mode": "random", "dtype": "bfloat16",
                         "experts": [{"source_model": str(e)} for e in experts]}), out)
    shutil.rmtree(family)


def _merge(config, out: Path) -> None:
    from studio.merge import MergeOptions, merge

    merge(config, out, MergeOptions(random_seed=0), log=lambda m: None)


def run(model: "Model", primer: Path, precision: str, args: argparse.Namespace) -> dict:
    job = {"model": str(model.path), "primer": str(primer), "precision": precision, "prompt": PROMPTS[model.name], "tokens": args.tokens,
           "repeat": args.repeat, "threads": args.threads}
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(job)], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO), "TRANSFORMERS_VERBOSITY": "error"})
    if proc.returncode != 0:
        raise SystemExit(f"{model.name} at {precision} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


@dataclass(frozen=True)
class Model:
    name: str
    path: Path
    parameters: int
    layer_bytes: int  # one layer's experts at bf16: the "one layer" of the loading bound

    @classmethod
    def at(cls, name: str, path: Path) -> "Model":
        from studio.quantize import layer_expert_bytes
        from studio.sources import open_model

        source = open_model(str(path))
        count = sum(info.nbytes // info.dtype.itemsize for info in source.tensors.values())
        return cls(name, path, count, layer_expert_bytes(source))


def table(results: dict[tuple[Model, str], dict]) -> str:
    from studio.report import format_table, human_bytes, human_count

    headers = ["model", "params", "precision", "footprint", "vs bf16", "load s", "load peak", "bound",
               "peak RSS", "new tokens", "tok/s off", "tok/s on", "capture cost"]
    rows = []
    for (model, precision), r in results.items():
        bf16 = results.get((model, "bf16"), r)["footprint"]
        rows.append([model.name, human_count(model.parameters), precision, human_bytes(r["footprint"]),
                     f"{r['footprint'] / bf16:.2f}", f"{r['load_seconds']:.1f}", human_bytes(r["load_peak"]),
                     human_bytes(1.5 * r["footprint"] + model.layer_bytes), human_bytes(r["peak"]),
                     "/".join(map(str, r["tokens"])), f"{r['off']:.1f}", f"{r['on']:.1f}",
                     f"{r['cost']:+.1%}"])
    return format_table(headers, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per reply (default 64)")
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds of capture off + on (default 7)")
    parser.add_argument("--precisions", default="bf16,4bit", help="comma-separated (default bf16,4bit)")
    parser.add_argument("--models", default="zoo,synthetic", help="comma-separated: zoo, synthetic")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in each run (default: torch's)")
    parser.add_argument("--workdir", type=Path, help="where models are built (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the built models")
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
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {threads}; "
          f"greedy, up to {args.tokens} new tokens, median of {args.repeat} rounds")
    print("load peak: RSS above the post-import RSS while loading; bound: 1.5 x footprint + one layer's experts "
          "(bf16)\n")
    print(table(results))


if __name__ == "__main__":
    main()
