"""GPU check: merging on the GPU, then 4-bit chat speed and footprint against bf16 and transformers + bitsandbytes.

One unattended run on a machine with a CUDA GPU, from a fresh venv with the project's requirements
(`pip install -r requirements.txt`); sized for about 9 minutes on an H200. It
  1. builds the synthetic Mistral families of benchmarks/chat_bench.py (4 fine-tunes, and 8 fine-tunes half as
     wide) and merges each with `python -m studio merge CONFIG OUT --device cuda`, hidden-state gates, so
     that the hidden-state pass runs on the GPU;
  2. chats with both merges on the GPU as benchmarks/chat_bench.py does (a fresh process per run, greedy,
     --tokens new tokens, median of --repeat rounds) at bf16, in our 4-bit, and in transformers' own 4-bit
     (BitsAndBytesConfig, which leaves fused experts at bf16), and prints chat_bench's table;
  3. merges the bundled zoo with `gate_mode: expert_text` on the device: the experts write calibration text,
     the routers are fitted, then refined end to end (bfloat16 on a GPU);
  4. prints one table of checks against the targets (4-bit tok/s at least 0.8x bf16 and faster than
     transformers + bitsandbytes; 4-bit footprint at most 0.3x bf16; the zoo's routers refined), each PASS or FAIL.

Exit status: 0 when every check passes, 1 when one fails, 2 when there is no CUDA GPU. `--device cpu` runs the
same steps on the CPU (a dry run of the script itself; the GPU targets do not apply there).

Usage: python benchmarks/gpu_check.py [--device cuda|cpu] [--tokens 64] [--repeat 3] [--timeout 240]
       [--workdir DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from chat_bench import FAMILIES, REPO, Model, build_models, run, table  # noqa: E402

MODELS = ("synthetic", "synthetic8")
PRECISIONS = ("bf16", "4bit", "bnb4")
MIN_SPEED_VS_BF16, MAX_FOOTPRINT_VS_BF16 = 0.8, 0.3
# One prompt list per expert, as a user's config has: the hidden-state pass reads them on the GPU.
PROMPTS = [["def add(a, b):", "import os"], ["12 + 7 =", "3 * 4 ="], ["Once upon a time", "The king walked"],
           ["Hello, how are you?", "Thank you"], ["Question: what is", "Answer:"], ["for i in range(10):", "class"],
           ["What is 15 minus 6?", "It is 9."], ["The quiet forest", "at night"]]


@dataclass
class Check:
    name: str
    measured: str
    target: str
    passed: bool

    def row(self) -> list[str]:
        return [self.name, self.measured, self.target, "PASS" if self.passed else "FAIL"]


def merge_on_device(root: Path, name: str, args: argparse.Namespace) -> tuple[Path, Check]:
    """A synthetic family merged by the command line on args.device, with hidden-state gates."""
    from studio.build.synthetic import make_family

    experts, shape = FAMILIES[name]
    base, fine_tunes = make_family(root / f"{name}-family", experts, **shape)
    out, measured, passed, _ = merge_command(root, name, {
        "base_model": str(base), "gate_mode": "hidden", "dtype": "bfloat16",
        "experts": [{"source_model": str(e), "positive_prompts": PROMPTS[i]} for i, e in enumerate(fine_tunes)]},
        args)
    return out, Check(f"merge --device {args.device}, {name} (hidden gates)", measured, "exit 0", passed)


def refine_on_device(root: Path, args: argparse.Namespace) -> Check:
    """The zoo merged with `gate_mode: expert_text` on args.device: the experts write their text, the routers are
    fitted, then refined end to end (in bfloat16 on a GPU). Passes when the merge ends with refinement's verdict
    (routers of a step, or the fitted ones kept by its held-out check): the refinement ran on the device."""
    config = yaml.safe_load((REPO / "benchmarks/natural/sentences.yml").read_text())
    config["gate_mode"] = "expert_text"
    config["base_model"] = str(REPO / config["base_model"])
    for expert in config["experts"]:
        expert["source_model"] = str(REPO / expert["source_model"])
    _, measured, passed, log = merge_command(root, "zoo-expert-text", config, args)
    name = f"merge --device {args.device}, zoo (expert_text, routers refined)"
    verdict = next((line for line in log if line.startswith("Kept the")), None)
    if passed and verdict is None:
        skipped = next((line for line in log if line.startswith("Router refinement")), "no verdict in its log")
        return Check(name, f"{measured}; refinement did not run: {skipped[:80]}", "refinement ran", False)
    return Check(name, measured + (f"; {verdict[:60]}" if verdict else ""), "refinement ran", passed)


MergeRun = tuple[Path, str, bool, list[str]]  # the output folder, what was measured, exit 0 or not, the log


def merge_command(root: Path, name: str, config: dict, args: argparse.Namespace) -> MergeRun:
    """`python -m studio merge` of `config` on args.device: the output folder, what was measured, whether it
    exited 0, and its log lines."""
    path = root / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    out = root / name
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "studio", "merge", str(path), str(out), "--device", args.device]
    start = time.perf_counter()
    try:
        proc = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=args.timeout)
        log = proc.stderr.strip().splitlines()
        failure = log[-1:] if proc.returncode else []
    except subprocess.TimeoutExpired:
        log, failure = [], [f"no result after {args.timeout:.0f} s"]
    seconds = time.perf_counter() - start
    measured = f"{seconds:.0f} s, " + (f"failed: {failure[0][:80]}" if failure else "written")
    return out, measured, not failure, log


def chat_checks(model: Model, results: dict) -> list[Check]:
    """The targets of one model, from its bf16, 4bit and bnb4 results (a missing result fails its checks)."""
    bf16, ours, bnb = (results.get((model, p)) for p in PRECISIONS)
    speed = ours["off"] / bf16["off"] if ours and bf16 else None
    versus_bnb = ours["off"] / bnb["off"] if ours and bnb else None
    size = ours["footprint"] / bf16["footprint"] if ours and bf16 else None
    shown = lambda ratio, what: f"{ratio:.2f}x {what}" if ratio is not None else "no result"  # noqa: E731
    return [Check(f"{model.name}: 4-bit tok/s", shown(speed, "bf16"), f">= {MIN_SPEED_VS_BF16}x bf16",
                  speed is not None and speed >= MIN_SPEED_VS_BF16),
            Check(f"{model.name}: 4-bit tok/s", shown(versus_bnb, "transformers + bnb"),
                  "> 1x transformers + bnb", versus_bnb is not None and versus_bnb > 1),
            Check(f"{model.name}: 4-bit footprint", shown(size, "bf16"), f"<= {MAX_FOOTPRINT_VS_BF16}x bf16",
                  size is not None and size <= MAX_FOOTPRINT_VS_BF16)]


def environment(device: str) -> str:
    import bitsandbytes
    import torch
    import transformers

    where = torch.cuda.get_device_name(0) if device == "cuda" else "CPU (dry run: the GPU targets do not apply)"
    return (f"{where}; torch {torch.__version__}, transformers {transformers.__version__}, "
            f"bitsandbytes {bitsandbytes.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the steps")
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per reply (default 64)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds of capture off + on (default 3)")
    parser.add_argument("--timeout", type=float, default=240, help="seconds a merge or a chat run may take")
    parser.add_argument("--workdir", type=Path, help="where models are built (default: a temporary folder)")
    args = parser.parse_args()
    args.threads = 0  # torch's default

    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("No CUDA GPU: torch sees none here (CPU-only torch, no driver, or no device). This check needs one; "
              "`--device cpu` runs its steps on the CPU as a dry run.")
        return 2
    print(environment(args.device))
    root = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-check-"))
    root.mkdir(parents=True, exist_ok=True)
    checks, results = [], {}
    try:
        primer = build_models(root, [])["primer"]
        for name in MODELS:
            path, merged = merge_on_device(root, name, args)
            checks.append(merged)
            if not merged.passed:
                continue
            model = Model.at(name, path)
            for precision in PRECISIONS:
                try:
                    results[(model, precision)] = run(model, primer, precision, args)
                except (SystemExit, subprocess.TimeoutExpired) as exc:  # one failed run fails its checks only
                    print(f"{name} at {precision}: {str(exc)[-1500:]}", file=sys.stderr)
            checks += chat_checks(model, results)
        checks.append(refine_on_device(root, args))
    finally:
        if not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    from studio.formatting import format_table

    print(f"\nchat: greedy, up to {args.tokens} new tokens, median of {args.repeat} rounds, device {args.device}\n")
    print(table(results))
    print()
    print(format_table(["check", "measured", "target", "result"], [c.row() for c in checks]))
    passed = all(c.passed for c in checks)
    print(f"\n{'PASS' if passed else 'FAIL'}: {sum(c.passed for c in checks)} of {len(checks)} checks passed")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
