"""Where model weights come from: local folders and Hugging Face Hub repos, read one tensor at a time.

safetensors files are indexed from their headers and memory-mapped, so reading a tensor costs only its
own bytes, and a tensor that needs no change can be copied file-to-file without passing through Python.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from studio.errors import StudioError
from studio.hub_errors import hub_failure

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
HUB_ID = re.compile(r"^[\w.\-]+(/[\w.\-]+)?$")
MAX_HEADER = 100 * 2**20


@dataclass(frozen=True)
class ModelRef:
    """A model as written in a config: a local folder, `org/name`, or `org/name@revision`."""

    text: str
    location: str
    revision: str | None = None

    @classmethod
    def parse(cls, text: str) -> "ModelRef":
        if "+" in text and not Path(text).exists():
            raise StudioError(f"Model {text!r}: `model+lora` references are not supported; merge the LoRA into "
                              f"its model first and point the config at the result.")
        if Path(text).expanduser().exists():
            return cls(text, text)
        location, _, revision = text.partition("@")
        return cls(text, location, revision or None)

    @property
    def is_local(self) -> bool:
        looks_like_path = self.location.startswith((".", "/", "~")) or self.location.count("/") > 1
        return Path(self.location).expanduser().exists() or looks_like_path or not HUB_ID.match(self.location)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives. `offset` is the byte offset in `path` (None for .bin checkpoints)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    path: Path
    offset: int | None

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)


def tensor_nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return math.prod(shape) * dtype.itemsize


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Index a .safetensors file from its header, checking that every tensor lies inside the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_len = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if not 0 < header_len <= min(MAX_HEADER, size - 8):
            raise StudioError(f"{path} is not a valid safetensors file (bad header length); the file is truncated "
                              f"or corrupt. Download it again.")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            raise StudioError(f"{path} has a corrupt safetensors header; download the file again.") from None
    if not isinstance(header, dict):
        raise StudioError(f"{path} has a corrupt safetensors header (a JSON {type(header).__name__}, not an "
                          f"object); download the file again.")
    data_start = 8 + header_len
    index = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            start, end = (int(x) for x in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise StudioError(f"{path}: tensor {name[:80]!r} has an unreadable header entry "
                              f"{repr(meta)[:120]}.") from None
        info = TensorInfo(name, dtype, shape, path, data_start + start)
        if end - start != info.nbytes or data_start + end > size:
            raise StudioError(f"{path}: tensor {name[:80]!r} lies outside the file or has the wrong size; the file is "
                              f"truncated or corrupt. Download it again.")
        index[name] = info
    return index


def _weight_files(folder: Path) -> list[Path]:
    """The checkpoint files of a folder: safetensors preferred, .bin otherwise."""
    for index_name, single, pattern in (("model.safetensors.index.json", "model.safetensors", "*.safetensors"),
                                        ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model*.bin")):
        index_file = folder / index_name
        if index_file.exists():
            try:
                weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
                files = [folder / name for name in dict.fromkeys(weight_map.values())]
            except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, KeyError, TypeError, AttributeError):
                raise StudioError(f"{index_file} is not a valid shard index (it needs a `weight_map` object of "
                                  f"tensor names to file names).") from None
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise StudioError(f"{folder}: the shard index lists {', '.join(missing)}, which is not in the "
                                  f"folder. Download the model again.")
            return files
        if (folder / single).exists():
            return [folder / single]
        found = sorted(folder.glob(pattern))
        if found:
            return found
    raise StudioError(f"{folder} holds no model weights (no *.safetensors or pytorch_model*.bin).")


@dataclass
class ModelSource:
    """One model's config and tensors, read lazily."""

    ref: ModelRef
    folder: Path
    config: dict
    tensors: dict[str, TensorInfo]
    _bins: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def label(self) -> str:
        return self.ref.text

    def has(self, name: str) -> bool:
        return name in self.tensors

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise StudioError(f"Model {self.label}: tensor {name!r} is missing from its checkpoint in "
                              f"{self.folder}. Is it the architecture the config says it is?") from None

    def read(self, name: str) -> torch.Tensor:
        """The tensor in memory of its own, read with one call; nothing else of the file is kept."""
        info = self.info(name)
        if info.offset is None:
            state = self._bins.get(info.path)
            if state is None:
                state = self._bins[info.path] = load_bin(info.path)
            return state[name]
        raw = torch.empty(info.nbytes, dtype=torch.uint8)
        with open(info.path, "rb", buffering=0) as f:
            f.seek(info.offset)
            if f.readinto(raw.numpy()) != info.nbytes:
                raise StudioError(f"{info.path}: unexpected end of file while reading {name!r}; the file is "
                                  f"truncated. Download it again.")
        return raw.view(info.dtype).reshape(info.shape)

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows of a 2-D tensor (an embedding's token rows), reading only those rows from disk."""
        info = self.info(name)
        bad = [r for r in rows if not 0 <= r < info.shape[0]]
        if bad:
            raise StudioError(f"Model {self.label}: row {bad[0]} of {name!r} does not exist (it has {info.shape[0]} "
                              f"rows); does the tokenizer belong to this model?")
        if info.offset is None:
            return self.read(name)[rows]
        unique = sorted(set(rows))
        row_bytes = info.nbytes // info.shape[0]
        raw = torch.empty((len(unique), row_bytes), dtype=torch.uint8)
        with open(info.path, "rb", buffering=0) as f:
            for i, row in enumerate(unique):
                f.seek(info.offset + row * row_bytes)
                f.readinto(raw[i].numpy())
        table = raw.view(info.dtype).reshape(len(unique), *info.shape[1:])
        position = {row: i for i, row in enumerate(unique)}
        return table[torch.tensor([position[r] for r in rows], dtype=torch.long)]

    def file(self, name: str) -> Path | None:
        path = self.folder / name
        return path if path.exists() else None


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a model's file, or a StudioError naming the file and what to do."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StudioError(f"{path.parent} has no {path.name}; is it a Hugging Face model folder?") from None
    except IsADirectoryError:
        raise StudioError(f"{path} is a folder, not a JSON file; {what}.") from None
    except UnicodeDecodeError as exc:
        raise StudioError(f"{path} is not UTF-8 text (byte {exc.object[exc.start]:#04x} at position {exc.start}); "
                          f"{what}.") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise StudioError(f"{path} is not valid JSON ({str(exc)[:200]}); {what}.") from None
    if not isinstance(data, dict):
        raise StudioError(f"{path} holds a JSON {JSON_KINDS.get(type(data).__name__, 'value')}, not an object of "
                          f"settings such as `hidden_size`; {what}.")
    return data


# config.json fields read as whole numbers; a string "192" or `true` would compare and compute wrongly.
INT_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "vocab_size", "head_dim", "num_local_experts", "num_experts_per_tok", "max_position_embeddings")


STR_FIELDS = ("model_type", "torch_dtype", "dtype")
OBJECT_FIELDS = ("rope_parameters", "rope_scaling")
JSON_KINDS = {"str": "string", "dict": "object", "list": "list", "bool": "bool", "int": "int", "float": "float",
              "NoneType": "null"}


def check_model_config(path: Path, config: dict) -> None:
    """Named errors for config.json fields of the wrong type (a JSON string where a number belongs)."""
    def wrong(key: str, value, should: str) -> StudioError:
        shown = json.dumps(value)
        shown = shown if len(shown) <= 40 else shown[:40] + "..."
        return StudioError(f"{path}: `{key}` is {shown} (a JSON {JSON_KINDS.get(type(value).__name__, 'value')}), "
                           f"but it must be {should}; fix the model's config.json.")

    for key in INT_FIELDS:
        value = config.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise wrong(key, value, "a whole number of 0 or more")
    for key in STR_FIELDS:
        if config.get(key) is not None and not isinstance(config[key], str):
            raise wrong(key, config[key], "a string")
    for key in OBJECT_FIELDS:
        if config.get(key) is not None and not isinstance(config[key], dict):
            raise wrong(key, config[key], "an object (or null)")


def index_folder(folder: Path) -> dict[str, TensorInfo]:
    """Every tensor of a local checkpoint, from headers only."""
    index: dict[str, TensorInfo] = {}
    for path in _weight_files(folder):
        if path.suffix == ".safetensors":
            index.update(read_safetensors_header(path))
        else:
            state = load_bin(path)
            index.update({k: TensorInfo(k, v.dtype, tuple(v.shape), path, None) for k, v in state.items()})
    return index


def load_bin(path: Path) -> dict[str, torch.Tensor]:
    """A PyTorch checkpoint, memory-mapped, tensors only: a pickle that would run code is refused, by name."""
    import pickle
    import warnings
    import zipfile

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns about pickle protocols before it refuses a file
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # the pre-zip format cannot be mapped
    except pickle.UnpicklingError as exc:
        called = re.search(r"Unsupported global: GLOBAL (\S+)", str(exc))
        if called:
            raise StudioError(f"{path} is a pickle that would run code when loaded (it calls `{called[1][:80]}`), "
                              f"so it is refused. Use a safetensors copy of the model, or convert it with a tool you "
                              f"trust.") from None
        raise StudioError(f"{path} is not a readable PyTorch checkpoint (its pickle holds instructions a checkpoint "
                          f"does not have); it is corrupt or not a checkpoint. Download it again.") from None
    except (RuntimeError, ValueError, EOFError, OSError, zipfile.BadZipFile, AttributeError, TypeError) as exc:
        raise StudioError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:120]}); "
                          f"it is corrupt, truncated or not a checkpoint. Download it again.") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise StudioError(f"{path} holds a {type(state).__name__}, not a mapping of tensor names to tensors; it is "
                          f"not a model checkpoint.")
    return state


def open_local(ref: ModelRef, folder: Path) -> ModelSource:
    if folder.exists() and not folder.is_dir():
        raise StudioError(f"Model {ref.text!r}: {folder} is a file, not a model folder. Give the folder that holds "
                          f"config.json and the weights.")
    if not folder.is_dir():
        raise StudioError(f"Model {ref.text!r}: folder {folder} does not exist. Check the path, or use a Hub id "
                          f"such as `mistralai/Mistral-7B-v0.1`.")
    config = read_json(folder / "config.json", "fix or re-download the model")
    check_model_config(folder / "config.json", config)
    return ModelSource(ref, folder, config, index_folder(folder))


# Hub access: a thin layer over huggingface_hub. The token comes from HF_TOKEN or the login cache and is
# never printed; huggingface_hub reads it itself.
HUB_PATTERNS = ["*.json", "tokenizer.model", "*.jinja", "merges.txt", "vocab.txt"]


def hub_error(ref: ModelRef, exc: Exception) -> StudioError:
    """One readable message for any huggingface_hub failure about `ref`."""
    return StudioError(f"{hub_failure(f'Model {ref.text!r}', exc, ref.revision)}.")


def download(ref: ModelRef, tqdm_class: type | None = None) -> Path:
    """Fetch only the files a merge needs: weights (safetensors, else .bin), json and tokenizer files."""
    from huggingface_hub import HfApi, snapshot_download

    try:
        if _offline():  # the cached snapshot, whichever weights it holds (a .bin-only repo has no *.safetensors)
            return Path(snapshot_download(ref.location, revision=ref.revision,
                                          allow_patterns=["*.safetensors"] + HUB_PATTERNS))
        files = HfApi().list_repo_files(ref.location, revision=ref.revision)
        weights = ["*.safetensors"] if any(f.endswith(".safetensors") for f in files) else ["*.bin"]
        return Path(snapshot_download(ref.location, revision=ref.revision, allow_patterns=weights + HUB_PATTERNS,
                                      tqdm_class=tqdm_class))
    except Exception as exc:  # huggingface_hub raises many types; each becomes one readable message
        raise hub_error(ref, exc) from exc


def _hub_index(ref: ModelRef) -> tuple[dict, dict[str, TensorInfo]]:
    """config.json and the tensor index of a Hub model, read without downloading its weights."""
    from huggingface_hub import HfApi, hf_hub_download

    try:
        config = json.loads(Path(hf_hub_download(ref.location, "config.json", revision=ref.revision)).read_text())
        meta = HfApi().get_safetensors_metadata(ref.location, revision=ref.revision)
    except Exception as exc:
        raise hub_error(ref, exc) from exc
    index = {}
    for filename, file_meta in meta.files_metadata.items():
        for name, t in file_meta.tensors.items():
            index[name] = TensorInfo(name, SAFETENSORS_DTYPES[t.dtype], tuple(t.shape), Path(filename), None)
    return config, index


def _offline() -> bool:
    """HF_HUB_OFFLINE=1: only models already in the Hub cache can be opened."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def open_model(text: str, fetch_weights: bool = True, tqdm_class: type | None = None) -> ModelSource:
    """Open a model reference. Without `fetch_weights`, Hub models are indexed from metadata only."""
    ref = ModelRef.parse(text)
    if ref.is_local:
        return open_local(ref, Path(ref.location).expanduser())
    if fetch_weights or _offline():  # offline, the Hub's metadata is out of reach but a cached model is not
        return open_local(ref, download(ref, tqdm_class))
    config, index = _hub_index(ref)
    return ModelSource(ref, Path(ref.location), config, index)


def open_models(refs: list[str], fetch_weights: bool = True, on_open: Callable[[str], None] | None = None,
                tqdm_class: type | None = None) -> dict[str, ModelSource]:
    """Open each distinct reference once; `tqdm_class` shows the progress of Hub downloads."""
    sources = {}
    for text in refs:
        if on_open:
            on_open(text)
        sources[text] = open_model(text, fetch_weights, tqdm_class)
    return sources


def progress_tqdm(report: Callable[[str, int, int], None]) -> type:
    """A tqdm class (for huggingface_hub's `tqdm_class`) that calls report(description, done, total) and draws
    nothing: the studio's own bar shows the download (in the Build tab, the Chat tab and under `merge`)."""
    from tqdm.std import tqdm

    class Reporting(tqdm):
        # Counted here: a disabled bar keeps no counts of its own. The total is read at each step, since
        # huggingface_hub sets it after making the bar when a file's size is known only then.
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.what, self.done = kwargs.get("desc") or "", 0
            report(self.what, self.done, int(self.total or 0))

        def update(self, n: float | None = 1) -> bool | None:
            self.done += int(n or 0)
            report(self.what, self.done, int(self.total or 0))
            return None

    return Reporting


def copy_bytes(info: TensorInfo, out, chunk: int = 64 * 2**20) -> None:
    """Append a tensor's raw bytes from its file to `out`, in the kernel where the OS allows."""
    with open(info.path, "rb") as src:
        remaining, offset = info.nbytes, info.offset
        out.flush()
        while remaining:
            try:
                sent = os.copy_file_range(src.fileno(), out.fileno(), min(chunk, remaining), offset)
            except (AttributeError, OSError):
                src.seek(offset)
                sent = out.write(src.read(min(chunk, remaining)))
                out.flush()
            if sent == 0:
                raise StudioError(f"{info.path}: unexpected end of file while copying {info.name!r}.")
            offset += sent
            remaining -= sent


def nonfinite_count(tensor: torch.Tensor) -> int:
    """NaN and Inf elements of a tensor (none in an integer one)."""
    if not tensor.is_floating_point():
        return 0
    return int((~torch.isfinite(tensor)).sum())
