"""Every bad input gets a named error: exit code 2, one paragraph that says what is wrong, no traceback, nothing
written. A corpus of configs, model folders, flags and paths, each with the phrase its error must contain.

The CLI runs in-process (studio.app.cli.main); the models are the session's small real ones, copied and broken.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from studio.app.cli import main

from conftest import PROMPTS


def run(capsys, *args) -> tuple[int, str]:
    """Exit code and stderr of the CLI; argparse's own errors exit through SystemExit."""
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def assert_named(code: int, err: str, phrase: str) -> None:
    assert code == 2, err
    assert phrase in err, err
    assert "Traceback" not in err
    assert "\n\n" not in err.strip(), "more than one paragraph"
    assert len(err) < 3000, f"{len(err)} characters: the message must quote only an excerpt"


# ---------------------------------------------------------------------------------------------------- configs
# (id, text with {base} {e1} {e2} for the models, phrase). Each is written to a file and merged.
GOOD = "base_model: {base}\ngate_mode: random\nexperts:\n  - source_model: {e1}\n  - source_model: {e2}\n"
PROMPTED = ("base_model: {base}\nexperts:\n  - source_model: {e1}\n    positive_prompts: [code]\n"
            "  - source_model: {e2}\n    positive_prompts: [math]\n")


def expert_field(line: str) -> str:
    return GOOD.replace("  - source_model: {e2}\n", "  - source_model: {e2}\n    " + line + "\n")


BOMB = "a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
    f"{n}: &{n} [{','.join(['*' + p] * 10)}]\n" for p, n in zip("abcdef", "bcdefg"))
CONFIG_CASES = [
    ("empty file", "", "expected a mapping with `base_model` and `experts`, got NoneType"),
    ("a list", "- a\n- b\n", "expected a mapping with `base_model` and `experts`, got list"),
    ("a scalar", "hello\n", "expected a mapping with `base_model` and `experts`, got str"),
    ("unclosed bracket", "base_model: [a\n", "is not valid YAML: while parsing a flow sequence"),
    ("tab indent", "base_model: a\nexperts:\n\t- source_model: b\n", "is not valid YAML"),
    ("python tag", "!!python/object/apply:os.system ['true']\n", "could not determine a constructor"),
    ("undefined alias", "base_model: *nothing\n", "found undefined alias"),
    ("duplicate top key", "base_model: {base}\n" + GOOD,
     "key `base_model` appears twice in the same mapping, on line 1 and on line 2"),
    ("duplicate expert key", GOOD.replace("  - source_model: {e2}\n", "  - source_model: {e2}\n    source_model: x\n"),
     "key `source_model` appears twice in the same mapping, on line 5 and on line 6"),
    ("duplicate gate_mode", "gate_mode: hidden\n" + GOOD, "key `gate_mode` appears twice"),
    ("alias bomb", BOMB + GOOD, "expands to more than 200,000 values once its aliases"),
    ("alias bomb in a typed field", BOMB + "experts_per_token: *g\n" + GOOD, "expands to more than 200,000 values"),
    ("recursive alias", "a: &a [*a]\n" + GOOD, "an alias refers to a value that contains it (line 1)"),
    ("50,000 nested lists", "[" * 50_000 + "]" * 50_000, "nests lists or mappings more than 64 levels deep"),
    ("nested mappings", "a:\n" + "".join("  " * i + f"  k{i}:\n" for i in range(70)), "more than 64 levels deep"),
    ("too many aliases", "a: &a 1\nb: [" + ",".join(["*a"] * 1001) + "]\n", "uses more than 1000 aliases"),
    ("missing base_model", "experts:\n  - source_model: {e1}\n", "`base_model`: required field is missing"),
    ("null base_model", "base_model:\nexperts:\n  - source_model: {e1}\n", "`base_model`: Input should be a valid string"),
    ("missing experts", "base_model: {base}\n", "`experts`: required field is missing"),
    ("empty experts", "base_model: {base}\nexperts: []\n", "`experts`: List should have at least 1 item"),
    ("experts a mapping", "base_model: {base}\nexperts:\n  a: b\n", "`experts`: Input should be a valid list"),
    ("expert a string", "base_model: {base}\nexperts:\n  - {e1}\n", "`experts[0]`: Input should be a valid dictionary"),
    ("misspelt key", "gateway_mode: random\n" + GOOD, "`gateway_mode`: unknown key (did you mean `gate_mode`?)"),
    ("mergekit-yaml config", "merge_method: ties\n" + GOOD, "this looks like a mergekit-yaml config"),
    ("tokenizer key", "tokenizer_source: base\n" + GOOD, "the base model's tokenizer is always used"),
    ("unknown expert key", expert_field("weight: 0.5"), "`experts[1].weight`: unknown key"),
    ("unknown gate mode", GOOD.replace("random", "hiden"), "unknown gate mode 'hiden' (did you mean `hidden`?)"),
    ("gate mode a list", GOOD.replace("random", "[random]"), "`gate_mode`: Input should be a valid string"),
    ("unknown dtype", "dtype: float8\n" + GOOD, "unknown dtype 'float8'"),
    ("unknown prompt format", "prompt_format: chatml\n" + GOOD, "unknown prompt format 'chatml'"),
    ("experts_per_token true", "experts_per_token: true\n" + GOOD,
     "`experts_per_token`: Input should be a valid integer (got True)"),
    ("experts_per_token string", "experts_per_token: '2'\n" + GOOD, "Input should be a valid integer (got '2')"),
    ("experts_per_token float", "experts_per_token: 1.5\n" + GOOD, "Input should be a valid integer (got 1.5)"),
    ("experts_per_token zero", "experts_per_token: 0\n" + GOOD, "Input should be greater than or equal to 1"),
    ("experts_per_token too many", "experts_per_token: 9\n" + GOOD,
     "`experts_per_token` is 9 but there are only 2 experts"),
    ("noise_scale nan", expert_field("noise_scale: .nan"), "`experts[1].noise_scale`: Input should be a finite number"),
    ("noise_scale nan text", expert_field("noise_scale: nan"), "`experts[1].noise_scale`: Input should be a finite"),
    ("noise_scale inf", expert_field("noise_scale: .inf"), "`experts[1].noise_scale`: Input should be a finite number"),
    ("noise_scale 1e40", expert_field("noise_scale: 1e40"), "Input should be less than or equal to 100"),
    ("noise_scale 1.0e+40", expert_field("noise_scale: 1.0e+40"), "Input should be less than or equal to 100"),
    ("noise_scale negative", expert_field("noise_scale: -0.1"), "Input should be greater than or equal to 0"),
    ("noise_scale true", expert_field("noise_scale: true"), "noise_scale`: must be a number, not true or false"),
    ("noise_scale text", expert_field("noise_scale: lots"), "`experts[1].noise_scale`: Input should be a valid number"),
    ("residual_scale nan", expert_field("residual_scale: .nan"), "`experts[1].residual_scale`: Input should be a finite"),
    ("residual_scale inf", expert_field("residual_scale: .inf"), "residual_scale`: Input should be a finite number"),
    ("residual_scale -inf", expert_field("residual_scale: -.inf"), "residual_scale`: Input should be a finite number"),
    ("residual_scale 1e300", expert_field("residual_scale: 1.0e+300"), "Input should be less than or equal to 100"),
    ("residual_scale list", expert_field("residual_scale: [1]"), "residual_scale`: Input should be a valid number"),
    ("residual_scale false", expert_field("residual_scale: false"), "must be a number, not true or false"),
    ("empty source_model", expert_field("positive_prompts: [a]").replace("source_model: {e1}", "source_model: ''"),
     "`experts[0].source_model`: String should have at least 1 character"),
    ("source_model a number", GOOD.replace("source_model: {e1}", "source_model: 123"),
     "`experts[0].source_model`: Input should be a valid string"),
    ("missing source_model", "base_model: {base}\nexperts:\n  - positive_prompts: [a]\n",
     "`experts[0].source_model`: required field is missing"),
    ("prompts a mapping", expert_field("positive_prompts: {a: b}"), "positive_prompts`: Input should be a valid list"),
    ("huge prompt", expert_field("positive_prompts: ['" + "x" * 30_000 + "']"),
     "`experts[1].positive_prompts[0]` is 30,000 characters long; a router prompt is at most 20,000"),
    ("no prompts, hidden gates", PROMPTED.replace("    positive_prompts: [math]\n", ""),
     "`experts[1]` ({e2}) has no `positive_prompts`"),
    ("same prompts", PROMPTED.replace("[math]", "[code]"), "Every expert has the same prompts"),
    ("identical experts", PROMPTED.replace("{e2}", "{e1}"), "identical experts are useless without training"),
    ("two shared experts", GOOD + "shared_experts:\n  - source_model: {e1}\n  - source_model: {e2}\n",
     "`shared_experts` has 2 entries; at most one shared expert is supported"),
    ("calibrated with a prompted shared expert",
     PROMPTED + "gate_mode: calibrated\nshared_experts:\n  - source_model: {e1}\n    positive_prompts: [x]\n",
     "`gate_mode: calibrated` fits the routers of the routed experts"),
    ("long garbage key", "k" * 1000 + ": 1\n" + GOOD, "`kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk... "
     "(1,000 characters)`: unknown key"),
    ("overlong key", "k" * 100_000 + ": 1\n" + GOOD, "mapping values are not allowed here"),
    ("long garbage value", "gate_mode: " + "g" * 100_000 + "\n" + GOOD.replace("gate_mode: random\n", ""),
     "unknown gate mode"),
    ("model+lora", GOOD.replace("{e1}", "org/model+org/lora"), "`model+lora` references are not supported"),
    ("missing expert folder", GOOD.replace("{e1}", "./no/such/model"), "folder no/such/model does not exist"),
    ("expert path is a file", GOOD.replace("{e1}", "{e1}/config.json"), "is a file, not a model folder"),
    ("base folder without config", GOOD.replace("{base}", "{empty}"), "has no config.json; is it a Hugging Face"),
    ("base folder without weights", GOOD.replace("{base}", "{config_only}"), "holds no model weights"),
]


@pytest.fixture(scope="module")
def folders(mistral, tmp_path_factory) -> dict[str, str]:
    base, experts = mistral
    root = tmp_path_factory.mktemp("corpus-models")
    (root / "empty").mkdir()
    (root / "config_only").mkdir()
    shutil.copy(base / "config.json", root / "config_only")
    return {"base": str(base), "e1": str(experts[0]), "e2": str(experts[1]), "empty": str(root / "empty"),
            "config_only": str(root / "config_only")}


@pytest.mark.parametrize("text, phrase", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config(capsys, tmp_path, folders, text, phrase):
    def fill(template: str) -> str:
        for key, value in folders.items():
            template = template.replace("{" + key + "}", value)
        return template

    config = tmp_path / "moe.yml"
    config.write_text(fill(text))
    code, err = run(capsys, "merge", config, tmp_path / "out")
    assert_named(code, err, fill(phrase))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe.yml"]


BYTES_CASES = [
    ("latin-1 byte", b"base_model: caf\xe9\nexperts: []\n", "is not UTF-8 text: byte 0xe9 on line 1 cannot be read"),
    ("utf-16", "base_model: a\n".encode("utf-16"), "is not UTF-8 text: byte 0xff on line 1"),
    ("binary", bytes(range(256)) * 4, "is not UTF-8 text: byte 0x80 on line"),
    ("over 4 MiB", b"# " + b"x" * (4 * 2**20 + 10) + b"\n", "is more than 4,194,304 bytes; a config is at most that"),
]


@pytest.mark.parametrize("data, phrase", [c[1:] for c in BYTES_CASES], ids=[c[0] for c in BYTES_CASES])
def test_bad_config_bytes(capsys, tmp_path, data, phrase):
    config = tmp_path / "moe.yml"
    config.write_bytes(data)
    assert_named(*run(capsys, "merge", config, tmp_path / "out"), phrase)


def test_config_that_is_not_a_file(capsys, tmp_path):
    assert_named(*run(capsys, "merge", tmp_path / "nope.yml", tmp_path / "out"), "Cannot read config file")
    assert_named(*run(capsys, "merge", tmp_path, tmp_path / "out"), "Cannot read config file")
    assert_named(*run(capsys, "merge", "/dev/zero", tmp_path / "out"), "/dev/zero is more than 4,194,304 bytes")


# ------------------------------------------------------------------------------------------------ model folders
def _edit_config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        data = json.loads((folder / "config.json").read_text())
        data.update(changes)
        (folder / "config.json").write_text(json.dumps(data))
    return edit


def _write(name: str, data: bytes | str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / name
        path.write_bytes(data) if isinstance(data, bytes) else path.write_text(data)
    return edit


def _tensors(change: Callable[[dict], None], name: str = "model.safetensors") -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        state = load_file(folder / name)
        change(state)
        save_file(state, folder / name, metadata={"format": "pt"})
    return edit


def _set_value(tensor: str, value: float, index=(0, 0)) -> Callable[[dict], None]:
    def change(state: dict) -> None:
        state[tensor][index] = value
    return change


def _to_bin(content: Callable[[dict], object] = lambda state: state, legacy: bool = False) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        state = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        torch.save(content(state), folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
    return edit


class RunsCode:
    """Unpickling this runs a command: what a malicious pytorch_model.bin holds."""

    def __reduce__(self):
        return (print, ("this ran while loading",))


def _header(header: dict | list) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        text = json.dumps(header).encode()
        (folder / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + b"\0" * 16)
    return edit


def _truncate(keep: int) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:keep])
    return edit


def _drop(tensor: str) -> Callable[[dict], None]:
    return lambda state: state.pop(tensor)


def _index(data: object) -> Callable[[Path], None]:
    return _write("model.safetensors.index.json", json.dumps(data))


UP = "model.layers.1.mlp.up_proj.weight"
EMBED = "model.embed_tokens.weight"
# (id, which model is broken, how, phrase); {model} is the broken folder.
MODEL_CASES = [
    ("config.json a list", "expert", _write("config.json", "[1, 2]"), "{model}/config.json holds a JSON list, not an"),
    ("config.json a string", "base", _write("config.json", '"mistral"'), "config.json holds a JSON string, not an object"),
    ("config.json garbage", "expert", _write("config.json", "{hidden_size: 64"), "config.json is not valid JSON"),
    ("config.json empty", "base", _write("config.json", ""), "config.json is not valid JSON"),
    ("config.json latin-1", "expert", _write("config.json", b'{"x": "caf\xe9"}'), "config.json is not UTF-8 text"),
    ("config.json deep", "expert", _write("config.json", "[" * 100_000 + "]" * 100_000), "is not valid JSON"),
    ("config.json a folder", "expert", lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir()),
     "config.json is a folder, not a JSON file"),
    ("no config.json", "expert", lambda f: (f / "config.json").unlink(), "{model} has no config.json"),
    ("hidden_size a string", "expert", _edit_config(hidden_size="64"),
     '`hidden_size` is "64" (a JSON string), but it must be a whole number'),
    ("hidden_size true", "expert", _edit_config(hidden_size=True), '`hidden_size` is true (a JSON bool)'),
    ("hidden_size negative", "base", _edit_config(hidden_size=-64), "`hidden_size` is -64 (a JSON int)"),
    ("hidden_size a float", "expert", _edit_config(hidden_size=64.0), "`hidden_size` is 64.0 (a JSON float)"),
    ("layers a list", "expert", _edit_config(num_hidden_layers=[2]), "`num_hidden_layers` is [2] (a JSON list)"),
    ("vocab_size a string", "base", _edit_config(vocab_size="384"), '`vocab_size` is "384" (a JSON string)'),
    ("model_type a list", "expert", _edit_config(model_type=["mistral"]),
     '`model_type` is ["mistral"] (a JSON list), but it must be a string'),
    ("torch_dtype an object", "base", _edit_config(torch_dtype={"a": 1}), '`torch_dtype` is {"a": 1} (a JSON object)'),
    ("rope_parameters a number", "base", _edit_config(rope_parameters=1.5),
     "`rope_parameters` is 1.5 (a JSON float), but it must be an object (or null)"),
    ("intermediate_size differs", "expert", _edit_config(intermediate_size=96),
     "intermediate_size is 96, but the base"),
    ("another family", "expert", _edit_config(model_type="llama"), "model family is llama, but the base"),
    ("unsupported model type", "base", _edit_config(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    ("no weights", "expert", lambda f: (f / "model.safetensors").unlink(), "holds no model weights"),
    ("weights truncated to 4 bytes", "expert", _truncate(4), "is not a valid safetensors file (bad header length)"),
    ("weights truncated", "expert", _truncate(2000), "is not a valid safetensors file"),
    ("weights truncated in the data", "base", lambda f: _truncate((f / "model.safetensors").stat().st_size - 100)(f),
     "lies outside the file or has the wrong size"),
    ("header not JSON", "expert", _write("model.safetensors", (12).to_bytes(8, "little") + b"{not json!!}"),
     "has a corrupt safetensors header"),
    ("header a JSON list", "expert", _header([1, 2]), "corrupt safetensors header (a JSON list, not an object)"),
    ("header entry unreadable", "expert", _header({"t": {"dtype": "F32"}}), "tensor 't' has an unreadable header"),
    ("header unknown dtype", "expert", _header({"t": {"dtype": "Q4", "shape": [1], "data_offsets": [0, 1]}}),
     "has an unreadable header entry"),
    ("zeroed file", "expert", _write("model.safetensors", b"\0" * 4096), "bad header length"),
    ("tensor missing", "expert", _tensors(_drop(UP)), f"tensor '{UP}' is missing from its checkpoint"),
    ("tensor of another shape", "expert", _tensors(lambda s: s.update({UP: s[UP][:96].clone()})),
     f"{UP} has shape [96, 64], but the base"),
    ("NaN in an expert", "expert", _tensors(_set_value(UP, float("nan"))),
     f"tensor '{UP}' in {{model}}/model.safetensors holds 1 non-finite values (NaN or Inf)"),
    ("Inf in an expert", "expert", _tensors(_set_value(UP, float("inf"), (3, 5))), "holds 1 non-finite values"),
    ("NaN in the base", "base", _tensors(_set_value(EMBED, float("nan"))),
     f"tensor '{EMBED}' in {{model}}/model.safetensors holds 1 non-finite values"),
    ("garbage pytorch_model.bin", "expert",
     lambda f: ((f / "model.safetensors").unlink(), (f / "pytorch_model.bin").write_bytes(b"garbage" * 100)),
     "pytorch_model.bin is not a readable PyTorch checkpoint"),
    ("zip that is not a checkpoint", "expert",
     lambda f: (shutil.make_archive(str(f / "x"), "zip", f), (f / "model.safetensors").unlink(),
                (f / "x.zip").rename(f / "pytorch_model.bin")),
     "pytorch_model.bin is not a readable PyTorch checkpoint"),
    ("pickle that runs code", "expert", _to_bin(lambda state: {**state, "x": RunsCode()}),
     "pytorch_model.bin is a pickle that would run code when loaded (it calls `print`)"),
    ("old-format pickle that runs code", "expert", _to_bin(lambda state: RunsCode(), legacy=True),
     "is a pickle that would run code"),
    ("plain pickle", "expert",
     lambda f: ((f / "model.safetensors").unlink(), (f / "pytorch_model.bin").write_bytes(pickle.dumps({"a": 1}))),
     "is not a readable PyTorch checkpoint"),
    ("checkpoint holding a list", "expert", _to_bin(lambda state: list(state.values())),
     "holds a list, not a mapping of tensor names to tensors"),
    ("index listing a missing shard", "expert", _index({"weight_map": {UP: "model-00009.safetensors"}}),
     "the shard index lists model-00009.safetensors, which is not in the folder"),
    ("index a list", "expert", _index([1]), "model.safetensors.index.json is not a valid shard index"),
    ("index without weight_map", "expert", _index({"metadata": {}}), "is not a valid shard index"),
    ("index weight_map a list", "expert", _index({"weight_map": [1]}), "is not a valid shard index"),
    ("generation_config.json garbage", "base", _write("generation_config.json", "{"),
     "generation_config.json is not valid JSON"),
    ("generation_config.json a list", "base", _write("generation_config.json", "[]"),
     "generation_config.json holds a JSON list, not an object"),
    ("no tokenizer in the base", "base",
     lambda f: [p.unlink() for p in f.iterdir() if p.name.startswith(("tokenizer", "special", "chat_template"))],
     "has no tokenizer files; add them, or pass --no-copy-tokenizer"),
]


@pytest.mark.parametrize("which, edit, phrase", [c[1:] for c in MODEL_CASES], ids=[c[0] for c in MODEL_CASES])
def test_bad_model_folder(capsys, tmp_path, mistral, which, edit, phrase):
    base, experts = mistral
    broken = tmp_path / "broken"
    shutil.copytree(base if which == "base" else experts[1], broken)
    edit(broken)
    refs = [broken, experts[0], experts[1]] if which == "base" else [base, experts[0], broken]
    data = {"base_model": str(refs[0]), "gate_mode": "random",
            "experts": [{"source_model": str(e)} for e in refs[1:]]}
    config = tmp_path / "moe.yml"
    config.write_text(yaml.safe_dump(data))
    code, err = run(capsys, "merge", config, tmp_path / "out")
    assert_named(code, err, phrase.replace("{model}", str(broken)))
    assert "this ran while loading" not in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "moe.yml"]


def test_nan_hidden_states_from_the_base_are_named_before_the_rename(capsys, tmp_path, mistral):
    """A NaN in the base's attention makes every hidden state NaN, so hidden gates would be NaN routers."""
    base, experts = mistral
    broken = tmp_path / "broken"
    shutil.copytree(base, broken)
    _tensors(_set_value("model.layers.0.self_attn.q_proj.weight", float("nan")))(broken)
    data = {"base_model": str(broken), "gate_mode": "hidden",
            "experts": [{"source_model": str(e), "positive_prompts": PROMPTS[i]} for i, e in enumerate(experts[:2])]}
    config = tmp_path / "moe.yml"
    config.write_text(yaml.safe_dump(data))
    code, err = run(capsys, "merge", config, tmp_path / "out")
    assert_named(code, err, "non-finite values (NaN or Inf)")
    assert "model.layers.0.self_attn.q_proj.weight" in err or "Router" in err
    assert not (tmp_path / "out").exists()


def test_a_float16_overflow_is_named_before_the_rename(capsys, tmp_path, mistral):
    base, experts = mistral
    broken = tmp_path / "broken"
    shutil.copytree(experts[1], broken)
    _tensors(_set_value(UP, 1e30))(broken)  # finite in bfloat16, infinite in float16
    data = {"base_model": str(base), "gate_mode": "random", "dtype": "float16",
            "experts": [{"source_model": str(experts[0])}, {"source_model": str(broken)}]}
    config = tmp_path / "moe.yml"
    config.write_text(yaml.safe_dump(data))
    code, err = run(capsys, "merge", config, tmp_path / "out")
    assert_named(code, err, "model.layers.1.block_sparse_moe.experts.1.w3.weight' from ")
    assert "would hold 1 non-finite values (NaN or Inf) as float16" in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------ flags
FLAG_CASES = [
    ("batch size 0", ["--batch-size", "0"], "argument --batch-size: 0 is not allowed; give 1 or more"),
    ("batch size -1", ["--batch-size", "-1"], "argument --batch-size: -1 is not allowed"),
    ("batch size text", ["--batch-size", "many"], "argument --batch-size: 'many' is not a whole number"),
    ("batch size float", ["--batch-size", "1.5"], "'1.5' is not a whole number"),
    ("device cuda without CUDA", ["--device", "cuda"], "--device cuda: no CUDA device is available here"),
    ("unknown device", ["--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ("shard size unit", ["--out-shard-size", "5X"], "'5X' is not a size; write e.g. 500M, 5B or 2GiB"),
    ("shard size empty", ["--out-shard-size", ""], "'' is not a size"),
    ("seed text", ["--random-seed", "abc"], "argument --random-seed: invalid int value: 'abc'"),
    ("unknown flag", ["--frobnicate"], "unrecognized arguments: --frobnicate"),
]


@pytest.mark.parametrize("flags, phrase", [c[1:] for c in FLAG_CASES], ids=[c[0] for c in FLAG_CASES])
def test_bad_flag(capsys, tmp_path, mistral, flags, phrase):
    if torch.cuda.is_available() and "cuda" in flags:
        pytest.skip("this machine has CUDA")
    base, experts = mistral
    config = tmp_path / "moe.yml"
    config.write_text(yaml.safe_dump({"base_model": str(base), "gate_mode": "random",
                                      "experts": [{"source_model": str(e)} for e in experts[:2]]}))
    assert_named(*run(capsys, "merge", config, tmp_path / "out", *flags), phrase)
    assert not (tmp_path / "out").exists()


OTHER_COMMAND_CASES = [
    ("chat without a model", ["chat"], "the following arguments are required: model"),
    ("chat max tokens 0", ["chat", "{moe}", "--max-new-tokens", "0"], "argument --max-new-tokens: 0 is not allowed"),
    ("chat on cuda", ["chat", "{moe}", "--device", "cuda"], "--device cuda: no CUDA device is available here"),
    ("chat on a missing folder", ["chat", "./no/such/moe"], "folder no/such/moe does not exist"),
    ("chat on a file", ["chat", "{moe}/config.json"], "is a file, not a model folder"),
    ("route on a config list", ["route", "{list_config}", "hi"], "config.json holds a JSON list, not an object"),
    ("chat on a dense model", ["chat", "{dense}", "--precision", "fp32"], "is not a Mixture-of-Experts model"),
    ("chat precision", ["chat", "{moe}", "--precision", "3bit"], "Unknown precision '3bit'; choose one of 4bit"),
    ("preview on cuda", ["preview", "{config}", "x", "--device", "cuda"], "no CUDA device is available here"),
    ("preview 1 MB prompt", ["preview", "{config}", "x" * 1_000_000],
     "Test prompt 1 is 1,000,000 characters long; a prompt is at most 20,000"),
    ("preview unknown gate mode", ["preview", "{config}", "x", "--gate-mode", "magic"], "unknown gate mode 'magic'"),
    ("plan on a bad config", ["plan", "{bad_config}"], "key `base_model` appears twice"),
    ("chat: 8 experts claimed, 2 in the weights", ["chat", "{liar}"],
     "config.json says num_local_experts = 8, but the router model.layers.0.block_sparse_moe.gate.weight in "
     "model.safetensors has 2 rows (one per expert): the config does not match the weights"),
    ("route: 8 experts claimed", ["route", "{liar}", "hi"], "config.json says num_local_experts = 8, but the router"),
    ("eval-routing: 8 experts claimed", ["eval-routing", "{liar}", "{prompts}"],
     "config.json says num_local_experts = 8, but the router"),
    ("eval-routing: config.json a list", ["eval-routing", "{list_config}", "{prompts}"],
     "config.json holds a JSON list, not an object"),
    ("eval-routing: missing folder", ["eval-routing", "./no/such/moe", "{prompts}"], "folder no/such/moe does not exist"),
    ("eval-routing: garbage weights", ["eval-routing", "{garbage}", "{prompts}"],
     "model.safetensors has a corrupt safetensors header"),
    ("route: hidden_size claimed wrong", ["route", "{wide}", "hi"], "config.json says hidden_size = 96, but the router"),
    ("route: layers claimed wrong", ["route", "{short}", "hi"],
     "config.json says num_hidden_layers = 1, but the weights hold routers up to layer 1"),
    ("chat: no tokenizer", ["chat", "{no_tokenizer}", "--precision", "fp32"], "its tokenizer cannot be loaded"),
    ("chat: NaN router", ["chat", "{nan_router}"], "the router model.layers.1.block_sparse_moe.gate.weight in "
     "model.safetensors holds 1 non-finite values (NaN or Inf)"),
    ("eval-routing: NaN router", ["eval-routing", "{nan_router}", "{prompts}"], "holds 1 non-finite values"),
    ("route: top-k above the experts", ["route", "{top5}", "hi"],
     "config.json says num_experts_per_tok = 5, but it must be between 1 and the 2 experts"),
    ("eval-routing: top-k 0", ["eval-routing", "{top0}", "{prompts}"], "num_experts_per_tok = 0, but it must be"),
    ("chat: vocab_size", ["chat", "{vocab}"], "config.json says vocab_size = 1000, but the embedding in "
     "model.safetensors has 384 rows"),
    ("eval-routing: a dense model_type over routers", ["eval-routing", "{dense_type}", "{prompts}"],
     "config.json says model_type 'mistral', a dense model, but the weights hold routers"),
    ("route: more layers claimed", ["route", "{tall}", "hi"],
     "config.json says num_hidden_layers = 5, but the weights hold layers 0 to 1 only"),
    ("chat: a router missing", ["chat", "{no_router}"], "layer 0 has experts but no router in its weights"),
    ("chat: heads do not fit the weights", ["chat", "{heads}", "--precision", "bf16"],
     "transformers cannot load its weights with its config.json"),
    ("route: generation_config.json garbage", ["route", "{bad_generation}", "hi", "--precision", "bf16"],
     "generation_config.json is not valid JSON"),
    ("eval-routing: alias bomb prompts", ["eval-routing", "{moe}", "{bomb}"], "expands to more than 200,000 values"),
    ("eval-routing: duplicate expert", ["eval-routing", "{moe}", "{duplicate}"], "key `0` appears twice"),
    ("eval-routing: no prompts file", ["eval-routing", "{moe}", "./no/prompts.yml"], "Cannot read the prompts file"),
    ("eval-routing: latin-1 prompts", ["eval-routing", "{moe}", "{latin}"], "is not UTF-8 text: byte 0xe9 on line 1"),
]


@pytest.fixture(scope="module")
def command_inputs(mistral, tmp_path_factory) -> dict[str, str]:
    from studio.build.merge import merge
    from studio.config import parse_config

    base, experts = mistral
    root = tmp_path_factory.mktemp("commands")
    data = {"base_model": str(base), "gate_mode": "random", "experts": [{"source_model": str(e)} for e in experts[:2]]}
    (root / "moe.yml").write_text(yaml.safe_dump(data))
    (root / "bad.yml").write_text(f"base_model: {base}\nbase_model: {base}\n")
    moe = merge(parse_config(data), root / "moe", log=lambda m: None).out
    listed = root / "listed"
    shutil.copytree(moe, listed)
    (listed / "config.json").write_text("[]")
    broken = {"liar": {"num_local_experts": 8}, "wide": {"hidden_size": 96}, "short": {"num_hidden_layers": 1},
              "top5": {"num_experts_per_tok": 5}, "top0": {"num_experts_per_tok": 0}, "vocab": {"vocab_size": 1000},
              "dense_type": {"model_type": "mistral"}, "tall": {"num_hidden_layers": 5},
              "heads": {"num_attention_heads": 3}}
    for name, change in broken.items():
        shutil.copytree(moe, root / name)
        (root / name / "config.json").write_text(json.dumps({**json.loads((moe / "config.json").read_text()),
                                                             **change}))
    shutil.copytree(moe, root / "garbage")
    (root / "garbage" / "model.safetensors").write_bytes((16).to_bytes(8, "little") + b"\xff" * 40)
    shutil.copytree(moe, root / "no_tokenizer")
    for path in (root / "no_tokenizer").glob("tokenizer*"):
        path.unlink()
    (root / "prompts.yml").write_text(yaml.safe_dump({0: ["def f():"], 1: ["12 + 7 ="]}))
    (root / "bomb.yml").write_text(BOMB + "0: *g\n")
    (root / "duplicate.yml").write_text("0: [a]\n0: [b]\n")
    (root / "latin.yml").write_bytes(b"0: [caf\xe9]\n")
    shutil.copytree(moe, root / "nan_router")
    router = "model.layers.1.block_sparse_moe.gate.weight"
    _tensors(_set_value(router, float("nan"), (1, 3)))(root / "nan_router")
    shutil.copytree(moe, root / "no_router")
    _tensors(_drop("model.layers.0.block_sparse_moe.gate.weight"))(root / "no_router")
    shutil.copytree(moe, root / "bad_generation")
    (root / "bad_generation" / "generation_config.json").write_text("{")
    return {"moe": str(moe), "config": str(root / "moe.yml"), "bad_config": str(root / "bad.yml"),
            "list_config": str(listed), "dense": str(base), "prompts": str(root / "prompts.yml"),
            **{name: str(root / name) for name in (*broken, "garbage", "no_tokenizer", "nan_router", "no_router",
                                                   "bad_generation")},
            **{name: str(root / f"{name}.yml") for name in ("bomb", "duplicate", "latin")}}


@pytest.mark.parametrize("args, phrase", [c[1:] for c in OTHER_COMMAND_CASES], ids=[c[0] for c in OTHER_COMMAND_CASES])
def test_bad_input_to_other_commands(capsys, command_inputs, args, phrase):
    if torch.cuda.is_available() and "cuda" in args:
        pytest.skip("this machine has CUDA")
    filled = [a.format(**command_inputs) if "{" in a else a for a in args]
    assert_named(*run(capsys, *filled), phrase)


# ------------------------------------------------------------------------------------------------------- paths
PATH_CASES = [
    ("empty", lambda t: "", 'The output folder is empty ("")'),
    ("blank", lambda t: "   ", 'The output folder is empty ("")'),
    ("root", lambda t: "/", "it is the working folder" if Path.cwd() == Path("/") else "it holds the working folder"),
    ("tmp", lambda t: "/tmp", "it holds the working folder" if Path("/tmp") in Path.cwd().resolve().parents
     else "top-level folder of the system"),  # a checkout under /tmp is named first
    ("usr", lambda t: "/usr", "top-level folder of the system"),
    ("a user's home", lambda t: "/home/somebody", "it is a user's home folder"),
    ("a file", lambda t: t / "file", "is a file; choose a folder path"),
    ("under a file", lambda t: t / "file" / "out", "is a file, not a folder"),
    ("deep under a file", lambda t: t / "file" / "a" / "b", "is a file, not a folder"),
    ("existing folder", lambda t: t / "photos", "already exists and is not empty"),
    ("a dangling link's target under a file", lambda t: t / "dangling", "is a file, not a folder"),
]


@pytest.mark.parametrize("make, phrase", [c[1:] for c in PATH_CASES], ids=[c[0] for c in PATH_CASES])
def test_bad_output_path(capsys, tmp_path, command_inputs, make, phrase):
    (tmp_path / "file").write_text("mine")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_text("meow")
    (tmp_path / "dangling").symlink_to(tmp_path / "file" / "x")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    assert_named(*run(capsys, "merge", command_inputs["config"], make(tmp_path)), phrase)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert (tmp_path / "file").read_text() == "mine" and (tmp_path / "photos" / "cat.jpg").read_text() == "meow"


def test_the_corpus_has_over_a_hundred_cases():
    count = len(CONFIG_CASES) + len(BYTES_CASES) + len(MODEL_CASES) + len(FLAG_CASES) + len(OTHER_COMMAND_CASES) \
        + len(PATH_CASES)
    assert count >= 100, count
