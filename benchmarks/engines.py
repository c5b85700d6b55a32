"""Do other engines run our outputs as transformers does? llama.cpp against transformers, per output family.

What is built, once, and cached in `.engines/` (ignored by git):
  * llama.cpp from the llama-cpp-python source package (`pip download --no-binary :all: --no-deps
    llama-cpp-python==VERSION`; its vendor/llama.cpp), CPU only, with cmake: only the llama library and
    `benchmarks/llama_probe/probe.cpp`, a small program that runs a GGUF on given token ids (greedy tokens,
    logits); nothing else of llama.cpp is compiled. About 20 minutes on the 2-core development machine, niced.
  * the converter's Python needs: gguf from the same package (its gguf-py) and sentencepiece (pip --target).

Then, for each output family the studio writes, a merge (float32) is converted with llama.cpp's own
`convert_hf_to_gguf.py` (--outtype f32) and both engines run the same token ids:
  * greedy tokens: N new tokens (argmax, no end-of-text stop) after each of four prompts (code, math, a story,
    a chat turn), counted equal position by position;
  * perplexity on held-out text of the zoo's four domains (256 tokens each), from each engine's logits, and the
    largest difference between the two engines' logits over those positions;
  * whether llama.cpp's own tokenizer (from the GGUF) gives the prompts' token ids as transformers' does.
The merges are of the zoo (Mistral architecture): Mixtral, Qwen MoE without, with a prompted and with an
unprompted shared expert, DeepSeek MoE without and with a shared expert; Qwen3 MoE needs Qwen3 models, so its
merge is of a small random Qwen3 family (studio.build.synthetic) with the synthetic tokenizer; Phi MoE likewise.

The zoo's tokenizer is its own (trained by studio.zoo), so the converter's table of known tokenizers (hashes of
known models' token ids) does not list it. Its pre-tokenizer is GPT-2's (byte-level with GPT-2's split, nothing
else), so the converter is run with that table falling back to "gpt-2" for exactly such tokenizers; the
tokenizer column checks the result.

Usage: python benchmarks/engines.py [--tokens 64] [--version 0.3.36] [--work DIR] [--only NAME ...] [--renormalise]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from studio.build.merge import MergeOptions, merge  # noqa: E402
from studio.config import parse_config  # noqa: E402
from studio.errors import StudioError  # noqa: E402

CACHE = ROOT / ".engines"
PROBE_SOURCE = Path(__file__).resolve().parent / "llama_probe"
ZOO = ROOT / "assets" / "zoo"
DOMAINS = ("code", "math", "stories", "chat")
PROMPTS = {"code": "def parse(line):", "math": "12 + 7 =", "stories": "Once upon a time",
           "chat": "What is the capital of France?"}
PPL_TOKENS = 256

# Runs llama.cpp's converter; a tokenizer whose hash the converter's table lacks, and whose pre-tokenizer is
# exactly GPT-2's (byte-level, GPT-2's split, no normalizer), is converted as "gpt-2".
CONVERT = r"""
import json, runpy, sys
from pathlib import Path

llama, model = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(llama))
from conversion import base

tokenizer = json.loads((model / "tokenizer.json").read_text())
pre = tokenizer.get("pre_tokenizer") or {}
gpt2_split = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not tokenizer.get("normalizer")
known = base.TextModel.get_vocab_base_pre

def get_vocab_base_pre(self, tok):
    try:
        return known(self, tok)
    except NotImplementedError:
        if gpt2_split:
            return "gpt-2"
        raise

base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(str(llama / "convert_hf_to_gguf.py"), run_name="__main__")
"""


@dataclass(frozen=True)
class Variant:
    name: str
    models: str  # "zoo", or a synthetic family ("qwen3", "phi")
    architecture: str
    shared: str | None = None  # None, "prompted" or "unprompted"


VARIANTS = [
    Variant("Mixtral", "zoo", "mixtral"),
    Variant("Qwen MoE, no shared expert", "zoo", "qwen"),
    Variant("Qwen MoE, prompted shared expert", "zoo", "qwen", "prompted"),
    Variant("Qwen MoE, unprompted shared expert", "zoo", "qwen", "unprompted"),
    Variant("Qwen3 MoE", "qwen3", "qwen3"),
    Variant("DeepSeek MoE, no shared expert", "zoo", "deepseek"),
    Variant("DeepSeek MoE, shared expert", "zoo", "deepseek", "unprompted"),
    Variant("Phi MoE", "phi", "phi"),
]


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def llama_source(version: str) -> Path:
    """vendor/llama.cpp of the llama-cpp-python sdist, downloaded and unpacked once."""
    folder = CACHE / f"llama_cpp_python-{version}"
    if not folder.exists():
        CACHE.mkdir(exist_ok=True)
        archive = CACHE / f"llama_cpp_python-{version}.tar.gz"
        if not archive.exists():
            done = run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                        f"llama-cpp-python=={version}", "-d", str(CACHE)])
            if done.returncode:
                sys.exit(f"pip could not download llama-cpp-python=={version}:\n{done.stderr[-2000:]}")
        with tarfile.open(archive) as tar:
            tar.extractall(CACHE, filter="data")
    return folder / "vendor" / "llama.cpp"


def build_probe(llama: Path) -> Path:
    """llama.cpp's library and the probe, built once (cmake, CPU only, niced, two jobs); later runs only rebuild
    what changed (the probe's source), which ninja finds at once."""
    build = CACHE / "build"
    steps = [["nice", "-n", "19", "cmake", "--build", ".", "--target", "llama-probe", "-j2"]]
    if not (build / "build.ninja").exists():
        build.mkdir(parents=True, exist_ok=True)
        print("Building llama.cpp (once; tens of minutes on 2 cores)...", file=sys.stderr)
        steps.insert(0, ["cmake", "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release", f"-DLLAMA_SOURCE={llama}",
                         str(PROBE_SOURCE)])
    for step in steps:
        done = run(step, cwd=build)
        if done.returncode:
            sys.exit(f"{' '.join(step)} failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return build / "llama-probe"


def converter_env(llama: Path) -> dict[str, str]:
    """PYTHONPATH with the package's own gguf and sentencepiece (installed once under .engines/pydeps)."""
    deps = CACHE / "pydeps"
    if not (deps / "sentencepiece").exists():
        done = run([sys.executable, "-m", "pip", "install", "-q", "--target", str(deps),
                    "sentencepiece>=0.1.98,<0.3.0"])
        if done.returncode:
            sys.exit(f"pip could not install sentencepiece:\n{done.stderr[-2000:]}")
    return {**os.environ, "PYTHONPATH": f"{llama / 'gguf-py'}{os.pathsep}{deps}", "HF_HUB_OFFLINE": "1"}


def zoo_prompts() -> dict[str, list[str]]:
    import yaml

    config = yaml.safe_load((ROOT / "assets" / "examples" / "zoo-4x.yml").read_text())
    return {Path(e["source_model"]).name: e["positive_prompts"] for e in config["experts"]}


def merge_config(variant: Variant, work: Path) -> dict:
    """The variant's config: the zoo's four experts (the zoo-4x prompts, hidden gates, float32), or a synthetic
    family's two."""
    if variant.models == "zoo":
        prompts = zoo_prompts()
        base = str(ZOO / "base")
        experts = [{"source_model": str(ZOO / d), "positive_prompts": prompts[d]} for d in DOMAINS]
    else:
        from studio.build.synthetic import make_family

        base_path, paths = make_family(work / f"{variant.models}-family", 4, variant.models, dtype=torch.float32,
                                       seed=7, **({"head_dim": 32} if variant.models == "qwen3" else {}))
        base = str(base_path)
        experts = [{"source_model": str(p), "positive_prompts": [PROMPTS[d]]} for p, d in zip(paths, DOMAINS)]
    config = {"base_model": base, "gate_mode": "hidden", "dtype": "float32", "architecture": variant.architecture,
              "experts": experts}
    if variant.shared:
        shared = {"source_model": experts[3]["source_model"]}
        if variant.shared == "prompted":
            shared["positive_prompts"] = experts[3]["positive_prompts"]
        config["shared_experts"] = [shared]
    return config


def prompt_texts(tokenizer) -> list[str]:
    """The four prompts; the chat one in the tokenizer's chat template, as a chat front end sends it."""
    texts = [PROMPTS[d] for d in DOMAINS[:3]]
    return texts + [tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS["chat"]}], tokenize=False,
                                                  add_generation_prompt=True)]


def held_out_texts(tokenizer) -> list[list[int]]:
    """The first PPL_TOKENS tokens of each zoo domain's held-out text (the text `quality ... zoo` scores), after
    BOS."""
    from studio.zoo.corpora import held_out_text_ids

    texts = held_out_text_ids(tokenizer)
    return [[tokenizer.bos_token_id] + texts[d][:PPL_TOKENS].tolist() for d in DOMAINS]


class TransformersRun:
    """The merge in transformers, float32: greedy tokens and logits for token ids."""

    def __init__(self, folder: Path, **config_overrides) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=True,
                                                          **config_overrides).eval()

    @torch.no_grad()
    def logits(self, ids: list[int]) -> np.ndarray:
        return self.model(input_ids=torch.tensor([ids])).logits[0].float().numpy()

    @torch.no_grad()
    def greedy(self, ids: list[int], n: int) -> list[int]:
        out, cache, step = [], None, torch.tensor([ids])
        for _ in range(n):
            result = self.model(input_ids=step, past_key_values=cache, use_cache=True)
            cache = result.past_key_values
            out.append(int(result.logits[0, -1].argmax()))
            step = torch.tensor([[out[-1]]])
        return out


def llama_probe(probe: Path, gguf: Path, ids: list[int], text: str, n: int, vocab: int) -> dict:
    """What the probe reports for `ids`: llama.cpp's tokens of `text`, `n` greedy tokens, the logits."""
    with tempfile.NamedTemporaryFile(suffix=".f32") as logits_file:
        done = run([str(probe), str(gguf), str(n), logits_file.name, text, *map(str, ids)], timeout=600)
        if done.returncode:
            raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "no output")
        lines = dict(line.split(":", 1) for line in done.stdout.splitlines() if ":" in line)
        logits = np.fromfile(logits_file.name, dtype=np.float32).reshape(len(ids), vocab)
    return {"tokenized": [int(t) for t in lines["tokenized"].split()],
            "generated": [int(t) for t in lines["generated"].split()], "logits": logits}


def without_bos(ids: list[int], tokenizer) -> list[int]:
    """The text's own tokens: whether llama.cpp adds BOS depends on GGUF metadata, not on the tokenizer."""
    return ids[1:] if ids[:1] == [tokenizer.bos_token_id] else ids


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    """exp of the mean next-token loss over the positions after the first."""
    shifted = torch.from_numpy(logits[:-1]).double()
    loss = torch.nn.functional.cross_entropy(shifted, torch.tensor(ids[1:]))
    return float(torch.exp(loss))


def compare(variant: Variant, work: Path, probe: Path, llama: Path, env: dict, tokens: int,
            renormalise: bool = False) -> dict:
    """One row of the table. `renormalise`: transformers runs the output with `norm_topk_prob: true`, as the
    studio wrote Qwen MoE and DeepSeek MoE before (the GGUF is the same: the converter does not read the key)."""
    from transformers import AutoTokenizer

    row = {"output": variant.name}
    folder = work / variant.name.replace(" ", "-").replace(",", "")
    try:
        merge(parse_config(merge_config(variant, work)), folder, MergeOptions(random_seed=0), log=lambda m: None)
    except StudioError as exc:
        return {**row, "problem": f"merge: {exc}"}
    gguf = folder.with_suffix(".gguf")
    started = time.perf_counter()
    done = run([sys.executable, "-c", CONVERT, str(llama), str(folder), "--outtype", "f32", "--outfile", str(gguf)],
               env=env, timeout=900)
    row["convert_s"] = time.perf_counter() - started
    if done.returncode:
        last = [line for line in done.stderr.strip().splitlines() if line.strip()][-1:]
        return {**row, "problem": f"convert_hf_to_gguf.py: {last[0] if last else done.returncode}"}
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    overrides = {"norm_topk_prob": True} if renormalise and "norm_topk_prob" in json.loads(
        (folder / "config.json").read_text()) else {}
    if overrides:
        row["output"] += " (norm_topk_prob: true)"
    reference = TransformersRun(folder, **overrides)
    vocab = reference.model.config.vocab_size
    equal = total = 0
    same_tokenizer = True
    try:
        for text in prompt_texts(tokenizer):
            ids = tokenizer(text)["input_ids"]
            ids = ids if ids[:1] == [tokenizer.bos_token_id] else [tokenizer.bos_token_id] + ids
            ours = llama_probe(probe, gguf, ids, text, tokens, vocab)
            theirs = reference.greedy(ids, tokens)
            equal += sum(a == b for a, b in zip(ours["generated"], theirs))
            total += tokens
            same_tokenizer &= without_bos(ours["tokenized"], tokenizer) == ids[1:]
        ppl_llama, ppl_hf, worst = [], [], 0.0
        for ids in held_out_texts(tokenizer):
            ours = llama_probe(probe, gguf, ids, "", 0, vocab)["logits"]
            theirs = reference.logits(ids)
            worst = max(worst, float(np.abs(ours - theirs).max()))
            ppl_llama.append(perplexity(ours, ids))
            ppl_hf.append(perplexity(theirs, ids))
    except RuntimeError as exc:
        return {**row, "problem": f"llama.cpp: {exc}"}
    return {**row, "equal": equal, "total": total, "max_logit_diff": worst, "same_tokenizer": same_tokenizer,
            "ppl_transformers": float(np.mean(ppl_hf)), "ppl_llama": float(np.mean(ppl_llama))}


def table(rows: list[dict]) -> str:
    lines = ["| output | greedy tokens equal | perplexity, transformers | perplexity, llama.cpp | "
             "max logit difference | prompt tokens equal |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "problem" in r:
            lines.append(f"| {r['output']} | {r['problem']} | | | | |")
            continue
        lines.append(f"| {r['output']} | {r['equal']}/{r['total']} | {r['ppl_transformers']:.4f} | "
                     f"{r['ppl_llama']:.4f} | {r['max_logit_diff']:.1e} | {'yes' if r['same_tokenizer'] else 'no'} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    parser.add_argument("--version", default="0.3.36", help="llama-cpp-python source package version")
    parser.add_argument("--work", type=Path, help="folder for the merges and GGUFs (default: a temporary one)")
    parser.add_argument("--only", nargs="*", help="output names to run (default: all)")
    parser.add_argument("--renormalise", action="store_true",
                        help="run transformers with norm_topk_prob: true, as Qwen MoE and DeepSeek MoE were written "
                             "before")
    args = parser.parse_args()
    torch.set_num_threads(2)
    llama = llama_source(args.version)
    probe = build_probe(llama)
    env = converter_env(llama)
    # the package ships llama.cpp's .git; without it, git would answer for the repository around .engines
    commit = run(["git", "-C", str(llama), "rev-parse", "--short=9", "HEAD"]).stdout.strip() \
        if (llama / ".git").exists() else ""
    work = args.work or Path(tempfile.mkdtemp(prefix="engines-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for variant in VARIANTS:
        if args.only and variant.name not in args.only:
            continue
        rows.append(compare(variant, work, probe, llama, env, args.tokens, args.renormalise))
        print(json.dumps(rows[-1]), file=sys.stderr)
    print(f"llama.cpp from llama-cpp-python=={args.version} (commit {commit or 'unknown'}), CPU, f32 GGUF; "
          f"transformers float32; {args.tokens} greedy tokens after each of 4 prompts; perplexity on "
          f"{PPL_TOKENS} held-out tokens of each of 4 domains.\n")
    print(table(rows))
    if not args.work:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
