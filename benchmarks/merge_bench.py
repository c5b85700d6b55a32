"""Merge benchmark: our `python -m studio merge` against `mergekit-moe` and a raw disk write.

What is built: a synthetic Mistral-architecture base model and N "fine-tunes" of it (default 4 experts of
~100M parameters each, bf16). They are written directly as safetensors files of random tensors with
Mistral's tensor names, plus a config.json and the studio's synthetic tokenizer; every expert shares the
base's non-MLP tensors and has MLPs of its own, so the experts are distinct but fit the base exactly.

What is measured, for each tool, in a fresh subprocess started from the command line (so import time is
part of every tool's time, ours and mergekit's alike):
  * wall time of the child, from spawn to exit;
  * its peak resident memory, from os.wait4's rusage (ru_maxrss, KiB on Linux);
  * the bytes of the output folder, and output GB/s = output bytes / wall.
The rows are: (1) ours, `python -m studio merge CONFIG OUT --out-shard-size 5B`; (2) `mergekit-moe CONFIG
OUT`, when that executable is on PATH; (3) a raw disk write of as many bytes as our output (64 MiB chunks,
then fdatasync), the reference speed of the disk; (4) `python -c "import torch, transformers"`, not a tool
but the start-up floor that any torch-based CLI pays, to read the others against.

The page cache cannot be dropped without root, so the inputs are hot in memory for every tool (they were
just written). Instead every tool first runs --warmup untimed rounds (on a VM, memory touched for the first
time is slow), then --repeat timed rounds, alternating the order each round; os.sync() runs before every
run so one tool's write-back does not land in the next one's time, and each output is measured and deleted
at once, so old outputs do not crowd the inputs out of the page cache. The table reports each tool's best
(minimum) wall time. Ours fsyncs its shards before the output is renamed into place (as the raw write does);
mergekit-moe does not fsync, so its time may exclude part of its write-back.

Usage: python benchmarks/merge_bench.py [--experts 4] [--params 100M] [--dtype bfloat16]
       [--gate-mode random|cheap_embed|hidden] [--repeat 2] [--warmup 1] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import yaml

if TYPE_CHECKING:
    import torch

# This process stays small (no torch import here): a child's ru_maxrss starts from its parent's peak RSS,
# which the kernel carries over at fork/exec, so a big parent would inflate every child's number.
REPO = Path(__file__).resolve().parents[1]
DTYPES = ("bfloat16", "float16", "float32")
TOPICS = ["python code", "arithmetic", "fairy tales", "small talk", "geography", "cooking", "music", "law"]
TARGETS = {"wall": 0.5, "rss": 0.5, "throughput": 0.7}
STARTUP = "import torch+transformers"  # not a tool: the start-up floor every torch-based CLI pays
RAW_WRITE = """
import os, sys
path, size, chunk = sys.argv[1], int(sys.argv[2]), 64 * 2**20
block = bytes(range(256)) * (chunk // 256)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
left = size
while left:
    left -= os.write(fd, memoryview(block)[:min(chunk, left)])
os.fdatasync(fd)
os.close(fd)
"""


@dataclass(frozen=True)
class Shape:
    """A Mistral model's dimensions."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int = 32000
    head_dim: int = 64

    @property
    def heads(self) -> int:
        return self.hidden // self.head_dim

    @property
    def kv_heads(self) -> int:
        return 4 if self.heads % 4 == 0 else self.heads

    def tensors(self) -> dict[str, tuple[int, ...]]:
        """Every tensor name of the dense model, with its shape."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, h)}
        for n in range(self.layers):
            p = f"model.layers.{n}."
            shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)}
        return shapes | {"model.norm.weight": (h,), "lm_head.weight": (self.vocab, h)}

    @property
    def parameters(self) -> int:
        return sum(math.prod(s) for s in self.tensors().values())

    def config(self, dtype: str) -> dict:
        return {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": self.hidden,
                "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False, "sliding_window": None,
                "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": dtype}


def shape_for(params: int) -> Shape:
    """A width from a small table by size, then as many layers as bring the total nearest to `params`."""
    hidden = 768 if params <= 3e8 else 2048 if params <= 1.5e9 else 3072 if params <= 4e9 else 4096
    intermediate = round(hidden * 8 / 3 / 256) * 256
    fixed = Shape(hidden, intermediate, 0).parameters  # embeddings, final norm, lm_head
    per_layer = Shape(hidden, intermediate, 1).parameters - fixed
    return Shape(hidden, intermediate, max(1, round((params - fixed) / per_layer)))


def parse_count(text: str) -> int:
    """'100M', '1.5B', '7e9' -> a number of parameters."""
    match = re.fullmatch(r"([\d.e+]+)([KMB]?)", text.strip().upper())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r} is not a parameter count; write e.g. 100M or 1B")
    return int(float(match[1]) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9}[match[2]])


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    import torch

    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)  # norm weights
    return torch.empty(shape, dtype=dtype).normal_(std=0.02)


def save_model(folder: Path, tensors: dict[str, torch.Tensor], shape: Shape, dtype: str, tokenizer) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(shape.config(dtype), indent=2))
    tokenizer.save_pretrained(folder)


def build_models(root: Path, shape: Shape, experts: int, dtype: str) -> tuple[Path, list[Path]]:
    """The base and `experts` fine-tunes: shared non-MLP tensors, fresh MLP tensors for each expert."""
    import torch

    sys.path.insert(0, str(REPO))
    from studio.build.synthetic import make_tokenizer

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    base = {name: random_tensor(s, getattr(torch, dtype)) for name, s in shape.tensors().items()}
    save_model(root / "base", base, shape, dtype, tokenizer)
    paths = []
    for e in range(1, experts + 1):
        mlps = {name: random_tensor(t.shape, t.dtype) for name, t in base.items() if ".mlp." in name}
        save_model(root / f"expert{e}", base | mlps, shape, dtype, tokenizer)
        paths.append(root / f"expert{e}")
    return root / "base", paths


def write_config(path: Path, base: Path, experts: list[Path], gate_mode: str, dtype: str) -> None:
    """A mergekit-moe config that both tools read; each expert gets prompts of its own."""
    entries = [{"source_model": str(p), "positive_prompts": [f"{TOPICS[i % len(TOPICS)]} {i}",
                                                              f"tell me about {TOPICS[i % len(TOPICS)]}"]}
               for i, p in enumerate(experts)]
    config = {"base_model": str(base), "gate_mode": gate_mode, "dtype": dtype, "experts": entries}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@dataclass
class Run:
    tool: str
    wall: float  # seconds
    rss: int  # bytes
    size: int  # output bytes
    tensors: tuple[int, int]  # safetensors tensor count and data bytes in the output


def run_child(cmd: list[str], log: Path, cwd: Path | None = None) -> tuple[float, int]:
    """Wall seconds and peak RSS bytes of one child process; raises if it fails."""
    env = os.environ | {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with open(log, "ab") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}; see {log}")
    return wall, usage.ru_maxrss * 1024


def folder_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def clear(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def tool_commands(config: Path, raw_bytes: Callable[[], int]) -> dict[str, Callable[[Path], list[str]]]:
    """Each tool's command line, given its output path."""
    tools = {"ours": lambda out: [sys.executable, "-m", "studio", "merge", str(config), str(out),
                                  "--out-shard-size", "5B"]}
    if shutil.which("mergekit-moe"):
        tools["mergekit"] = lambda out: ["mergekit-moe", str(config), str(out)]
    tools["raw disk"] = lambda out: [sys.executable, "-c", RAW_WRITE, str(out), str(raw_bytes())]
    tools[STARTUP] = lambda out: [sys.executable, "-c", "import torch, transformers"]
    return tools


def benchmark(config: Path, root: Path, repeat: int, warmup: int, keep: bool) -> dict[str, Run]:
    """Run every tool `warmup` times untimed, then `repeat` times, alternating the order; the best run of each.

    Each output is measured and removed at once (the last round's are kept with `keep`), so old outputs do
    not crowd the inputs out of the page cache.
    """
    sizes: dict[str, int] = {}
    tools = tool_commands(config, lambda: sizes["ours"])
    best: dict[str, Run] = {}
    rounds = warmup + repeat
    for i in range(rounds):
        for name in (list(tools) if i % 2 == 0 else list(reversed(tools))):
            slug = name.replace(" ", "-").replace("+", "-")
            out = root / f"out-{slug}"
            os.sync()
            wall, rss = run_child(tools[name](out), root / f"{slug}.log", cwd=REPO)
            sizes[name] = folder_bytes(out)
            run = Run(name, wall, rss, sizes[name], tensor_totals(out))
            if not (keep and i == rounds - 1):
                clear(out)
            what = "warm-up" if i < warmup else f"run {i - warmup + 1}/{repeat}"
            print(f"  {what:9s} {name:26s} {wall:7.2f} s {rss / 1e6:7.0f} MB", file=sys.stderr)
            if i >= warmup and (name not in best or wall < best[name].wall):
                best[name] = run
    return {name: best[name] for name in tools}


def tensor_totals(folder: Path) -> tuple[int, int]:
    """(tensor count, tensor data bytes) of a folder's safetensors files, from their headers."""
    count = size = 0
    for path in folder.glob("*.safetensors") if folder.is_dir() else []:
        with open(path, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        header.pop("__metadata__", None)
        count += len(header)
        size += sum(end - start for start, end in (t["data_offsets"] for t in header.values()))
    return count, size


def ratio_line(label: str, value: float, target: float, at_most: bool) -> str:
    ok = value <= target if at_most else value >= target
    sign = "<=" if at_most else ">="
    return f"- {label}: {value:.3f} (target {sign} {target:g}: {'met' if ok else 'NOT met'})"


def row(r: Run) -> str:
    size, speed = (f"{r.size / 1e9:.3f}", f"{r.size / r.wall / 1e9:.3f}") if r.size else ("-", "-")
    return f"| {r.tool} | {r.wall:.2f} | {r.rss / 1e6:.0f} | {size} | {speed} |"


def report(runs: dict[str, Run], repeat: int, warmup: int) -> str:
    lines = [f"Best (minimum) wall of {repeat} timed runs per tool (after {warmup} untimed warm-up round(s)), "
             f"alternating order; RSS and size from that run.", "",
             "| tool | wall s | peak RSS MB | output GB | GB/s |", "|---|---:|---:|---:|---:|"]
    lines += [row(r) for r in runs.values()]
    ours, raw, startup = runs["ours"], runs["raw disk"], runs[STARTUP]
    lines.append("")
    if "mergekit" in runs:
        mk = runs["mergekit"]
        lines.append(ratio_line("wall ours/mergekit", ours.wall / mk.wall, TARGETS["wall"], True))
        lines.append(ratio_line("peak RSS ours/mergekit", ours.rss / mk.rss, TARGETS["rss"], True))
    else:
        lines.append("- mergekit-moe not found on PATH; no mergekit comparison")
    throughput = (ours.size / ours.wall) / (raw.size / raw.wall)
    lines.append(ratio_line("throughput ours/raw disk", throughput, TARGETS["throughput"], False))
    lines.append("- Both merges are CLI runs: their wall time includes Python start-up and imports (torch, "
                 "transformers), and mergekit's includes its own imports too.")
    if ours.wall > startup.wall:
        net = ours.size / (ours.wall - startup.wall) / 1e9
        lines.append(f"- For scale only: ours minus the `{STARTUP}` floor writes {net:.3f} GB/s, "
                     f"{net * 1e9 / (raw.size / raw.wall):.2f} of raw disk.")
    lines.append("- ours and raw disk fsync their files before exiting; mergekit-moe does not, so part of its "
                 "write-back may fall outside its time.")
    if "mergekit" in runs:
        (n_ours, b_ours), (n_mk, b_mk) = ours.tensors, runs["mergekit"].tensors
        lines.append(f"- Tensor data: ours {b_ours / 1e9:.3f} GB in {n_ours} tensors, mergekit {b_mk / 1e9:.3f} GB "
                     f"in {n_mk} tensors ({'same bytes' if b_ours == b_mk else 'DIFFERENT bytes'}; the names "
                     f"differ where the expert layouts differ)")
    return "\n".join(lines)


def version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment(root: Path) -> str:
    packages = ", ".join(f"{p} {version(p)}" for p in ("torch", "transformers", "safetensors", "mergekit"))
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"Python {platform.python_version()}, {packages}; {platform.system()} {platform.release()}, "
            f"{os.cpu_count()} CPUs, {memory:.0f} GiB RAM; workdir {root}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--params", type=parse_count, default=parse_count("100M"), help="per model, e.g. 100M")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--gate-mode", choices=("random", "cheap_embed", "hidden"), default="cheap_embed")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per tool; the best is reported")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (fault in memory and caches)")
    parser.add_argument("--workdir", type=Path, help="where the models and outputs go (default: system temp)")
    parser.add_argument("--keep", action="store_true", help="keep the models and outputs")
    args = parser.parse_args()
    if args.repeat < 1 or args.warmup < 0 or args.experts < 1:
        parser.error("--repeat and --experts must be at least 1, --warmup at least 0")

    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="merge-bench-", dir=args.workdir))
    try:
        shape = shape_for(args.params)
        start = time.perf_counter()
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # torch stays out of this process
            base, experts = pool.apply(build_models, (root / "models", shape, args.experts, args.dtype))
        print(f"Built base + {args.experts} experts of {shape.parameters / 1e6:.1f}M parameters ({shape}) in "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)
        config = root / "moe.yml"
        write_config(config, base, experts, args.gate_mode, args.dtype)
        runs = benchmark(config, root, args.repeat, args.warmup, args.keep)
        print(f"\n## MoE merge: {args.experts} experts x {shape.parameters / 1e6:.0f}M, {args.dtype}, "
              f"gate_mode {args.gate_mode}\n\n{environment(root)}\n")
        print(report(runs, args.repeat, args.warmup))
    finally:
        if args.keep:
            print(f"\nKept {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
