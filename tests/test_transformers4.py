"""Our Mixtral output loads the same in transformers 4.x as in 5.x.

mergekit 0.1.5 writes the fused v5 expert layout, which transformers 4.x does not recognise: it loads such a
checkpoint with freshly initialised experts and routers (and only warns). Ours is written in the classic
`block_sparse_moe.experts.J.w1|w2|w3` names, so 4.x must load every tensor from the file and compute the same
logits as 5.x.

transformers 4.x runs in a subprocess from the `.venv-tf4` virtualenv made by `bash .ci/transformers4.sh`.
Each session checks it and makes or rebuilds it when missing or broken (set STUDIO_SKIP_TF4=1 to skip these tests
instead, when it does not exist); a failure to build it fails these tests with the reason.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from studio.build.merge import MergeOptions, merge
from studio.build.synthetic import make_family, make_tokenizer
from studio.config import parse_config

from helpers import ROOT, tf4_python

# name -> make_family arguments: both input families the Mixtral output accepts, and tied embeddings.
CASES = {
    "mistral": {"family": "mistral", "seed": 3},
    "llama": {"family": "llama", "seed": 4},
    "llama_tied": {"family": "llama", "tie": True, "layers": 3, "seed": 5},
}
PROMPTS = [["def add(a, b):", "import os"], ["12 + 7 =", "3 * 4 ="], ["Once upon a time", "The king walked"],
           ["Hello, how are you?", "Question: what is"]]
INPUT_IDS = [[1, 17, 42, 99, 200, 7, 300, 5, 383, 64], [1, 250, 3, 3, 120, 77, 18, 260, 11, 2]]
ATOL = 1e-4
TEXT = "def add(a, b):\n    return a + b"
CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|system|>")
CHAT_TEXT = "<|user|>\nWhat is 12 + 7?</s>\n<|assistant|>\n19</s>"

# Runs under .venv-tf4/bin/python: loads each output with transformers 4.x and reports what it found.
TF4_SCRIPT = r"""
import json, sys
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

job = json.loads(sys.argv[1])
results = {"version": transformers.__version__, "module": transformers.__file__, "outputs": {}}
for name, folder in job["outputs"].items():
    model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, torch_dtype=torch.float32)
    model.eval()
    on_disk = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        on_disk.update(load_file(path))
    state = model.state_dict()
    routers = sorted(k for k in on_disk if k.endswith("block_sparse_moe.gate.weight"))
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(job["input_ids"])).logits.float()
    results["outputs"][name] = {
        "class": type(model).__name__,
        "loading_info": {k: sorted(map(str, v)) for k, v in info.items()},
        "routers": routers,
        "routers_differing": [k for k in routers if not torch.equal(state[k], on_disk[k])],
        "file_tensors_differing": [k for k in on_disk if k not in state or not torch.equal(state[k], on_disk[k])],
        "parameters_not_in_file": sorted(set(state) - set(on_disk)),
        "lm_head_is_embedding": bool(torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)),
        "rope_theta": getattr(model.config, "rope_theta", None),
        "logits": logits.tolist(),
        "token_ids": AutoTokenizer.from_pretrained(folder)(job["text"])["input_ids"],
    }
results["tokenizers"] = {}
for name, folder in job["tokenizers"].items():
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer(job["chat_text"])["input_ids"]
    results["tokenizers"][name] = {"ids": ids, "special": sorted(tokenizer.all_special_tokens),
                                   "decoded": tokenizer.decode(ids, skip_special_tokens=True)}
Path(job["result"]).write_text(json.dumps(results))
"""


@pytest.fixture(scope="module")
def merged(tmp_path_factory) -> dict[str, Path]:
    """One float32 Mixtral merge per case (hidden gates, distinct prompts per expert)."""
    tokenizer = make_tokenizer()
    outputs = {}
    for name, shape in CASES.items():
        folder = tmp_path_factory.mktemp(f"tf4-{name}")
        base, experts = make_family(folder / "src", 4, dtype=torch.float32, tokenizer=tokenizer, **shape)
        config = parse_config({
            "base_model": str(base), "gate_mode": "hidden", "dtype": "float32",
            "experts": [{"source_model": str(e), "positive_prompts": PROMPTS[i]} for i, e in enumerate(experts)],
        })
        outputs[name] = merge(config, folder / "out", MergeOptions(random_seed=0), log=lambda _: None).out
    return outputs


@pytest.fixture(scope="module")
def tokenizer_folders(tmp_path_factory) -> dict[str, Path]:
    """The zoo's tokenizer, and a merge of a base whose tokenizer transformers 5 saved in its own spelling."""
    from studio.build.synthetic import train_bpe_tokenizer
    from studio.build.synthetic import CORPUS

    folder = tmp_path_factory.mktemp("tf4-tokenizers")
    tokenizer = train_bpe_tokenizer(CORPUS * 4, 384, extra_special_tokens=CHAT_TOKENS)
    base, experts = make_family(folder / "src", 2, dtype=torch.float32, tokenizer=tokenizer)
    tokenizer.save_pretrained(base)  # transformers 5's own files: extra_special_tokens as a list
    saved = json.loads((base / "tokenizer_config.json").read_text())
    assert saved["extra_special_tokens"] == list(CHAT_TOKENS) and saved["tokenizer_class"] == "TokenizersBackend"
    config = parse_config({"base_model": str(base), "gate_mode": "random", "dtype": "float32",
                           "experts": [{"source_model": str(e)} for e in experts]})
    out = merge(config, folder / "out", MergeOptions(random_seed=0), log=lambda _: None).out
    return {"zoo": ROOT / "assets" / "zoo" / "base", "merge_of_a_v5_tokenizer": out}


@pytest.fixture(scope="module")
def tf4(merged, tokenizer_folders, tmp_path_factory) -> dict:
    """What transformers 4.x made of every output: one subprocess for all of them."""
    result = tmp_path_factory.mktemp("tf4-result") / "result.json"
    job = {"outputs": {k: str(v) for k, v in merged.items()}, "input_ids": INPUT_IDS, "result": str(result),
           "text": TEXT, "tokenizers": {k: str(v) for k, v in tokenizer_folders.items()}, "chat_text": CHAT_TEXT}
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([str(tf4_python()), "-c", TF4_SCRIPT, json.dumps(job)], capture_output=True, text=True,
                          env=env, cwd=result.parent, timeout=300)
    assert proc.returncode == 0, f"transformers 4.x could not load the outputs:\n{proc.stderr[-4000:]}"
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def tf5(merged) -> dict:
    """The same, from the transformers 5.x installed here, in process."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert transformers.__version__.startswith("5."), transformers.__version__
    found = {}
    for name, folder in merged.items():
        model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, dtype=torch.float32)
        with torch.no_grad():
            logits = model.eval()(input_ids=torch.tensor(INPUT_IDS)).logits.float()
        found[name] = {"class": type(model).__name__, "loading_info": info, "logits": logits,
                       "rope_theta": model.config.rope_parameters["rope_theta"],
                       "token_ids": AutoTokenizer.from_pretrained(folder)(TEXT)["input_ids"]}
    return found


def tf4_results(request) -> dict:
    """Called in each test's body, so that a missing venv fails the test itself (with the setup hint)."""
    tf4_python()
    return request.getfixturevalue("tf4")


def test_runs_transformers_4_from_the_venv(request):
    found = tf4_results(request)
    assert found["version"].startswith("4."), found["version"]
    assert Path(found["module"]).is_relative_to(ROOT / ".venv-tf4"), found["module"]


@pytest.mark.parametrize("name", CASES)
def test_transformers_4_loads_every_tensor(request, name):
    out = tf4_results(request)["outputs"][name]
    assert out["class"] == "MixtralForCausalLM"
    problems = {k: v for k, v in out["loading_info"].items() if v}
    assert not problems, f"transformers 4.x loading info for {name}: {problems}"
    assert out["file_tensors_differing"] == [], "tensors that 4.x did not load from the file as written"
    tied = CASES[name].get("tie", False)
    assert out["parameters_not_in_file"] == (["lm_head.weight"] if tied else [])
    if tied:
        assert out["lm_head_is_embedding"]


@pytest.mark.parametrize("name", CASES)
def test_transformers_4_routers_are_the_files_gates(request, name):
    out = tf4_results(request)["outputs"][name]
    merged = request.getfixturevalue("merged")
    layers = json.loads((merged[name] / "config.json").read_text())["num_hidden_layers"]
    assert out["routers"] == sorted(f"model.layers.{l}.block_sparse_moe.gate.weight" for l in range(layers))
    assert out["routers_differing"] == [], "router weights were randomly initialised, not read from the file"


@pytest.mark.parametrize("name", CASES)
def test_transformers_4_and_5_compute_the_same_logits(request, name):
    four = tf4_results(request)["outputs"][name]
    five = request.getfixturevalue("tf5")[name]
    assert five["class"] == "MixtralForCausalLM"
    problems = {k: v for k, v in five["loading_info"].items() if v}
    assert not problems, f"transformers 5.x loading info for {name}: {problems}"
    # 4.x reads only the top-level rope_theta (else Mixtral's default, 1e6); 5.x reads rope_parameters.
    assert four["rope_theta"] == five["rope_theta"], "transformers 4.x and 5.x use different RoPE bases"
    logits4 = torch.tensor(four["logits"])
    assert logits4.shape == five["logits"].shape
    difference = (logits4 - five["logits"]).abs().max().item()
    assert difference <= ATOL, f"{name}: transformers 4.x and 5.x logits differ by up to {difference:.2e}"


@pytest.mark.parametrize("name", CASES)
def test_transformers_4_and_5_read_the_copied_tokenizer_alike(request, name):
    four = tf4_results(request)["outputs"][name]["token_ids"]
    assert four == request.getfixturevalue("tf5")[name]["token_ids"] and len(four) > 3


@pytest.mark.parametrize("name", ["zoo", "merge_of_a_v5_tokenizer"])
def test_transformers_4_and_5_read_tokenizers_with_extra_special_tokens_alike(request, name):
    from transformers import AutoTokenizer

    four = tf4_results(request)["tokenizers"][name]
    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue("tokenizer_folders")[name])
    ids = tokenizer(CHAT_TEXT)["input_ids"]
    assert four["ids"] == ids
    assert set(CHAT_TOKENS) <= set(four["special"]) and four["special"] == sorted(tokenizer.all_special_tokens)
    assert four["decoded"] == tokenizer.decode(ids, skip_special_tokens=True) == "\nWhat is 12 + 7?\n\n19"
