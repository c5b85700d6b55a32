"""Domain text from a local file or a file of a Hub dataset: the one reader of `calibration_text` and of the
texts that `quality` scores.

A source is a path, or `hf://datasets/OWNER/NAME[@REVISION]/PATH/IN/REPO` (the Hub's own URL form), optionally
ending in `#FIELD`. What the file holds decides how it is read:
  * `.jsonl` (one JSON record per line), `.json` (a list of records, or an object holding one) and `.parquet`
    (rows; needs pyarrow, which the studio does not install: `pip install pyarrow`): each record's text is its
    FIELD when one is given, else every string inside it in order (an instruction and its answer, or a chat's
    messages); records are separated by a blank line;
  * anything else is UTF-8 text, whole (Arrow files of a `datasets` cache are refused: give the dataset's own
    files).

Downloads go through huggingface_hub, whose cache, token (HF_TOKEN or the login) and offline switch
(HF_HUB_OFFLINE=1) apply; the token is never printed. Records are read up to MAX_CHARS, so a dataset of
gigabytes costs its download, not its size in memory.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from studio.errors import StudioError

HUB_PREFIX = "hf://datasets/"
MAX_CHARS = 4_000_000  # far more than a router fit (6144 tokens per expert) or a quality run (16384) reads
RECORDS = (".jsonl", ".json", ".parquet")
_HUB = re.compile(r"hf://datasets/(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/]+))?/(?P<path>.+)$")
_FIELD = re.compile(r"(?P<file>.*\.(?:jsonl?|parquet))#(?P<field>[^#/]+)$", re.IGNORECASE)


def is_hub(source: str) -> bool:
    return source.startswith(HUB_PREFIX)


def source_problem(source: str, relative_to: Path | None = None) -> str | None:
    """What is wrong with `source` before anything is downloaded, or None."""
    source, _ = _field_of(source)
    if is_hub(source):
        match = _HUB.match(source)
        if match is None:
            return (f"{source} is not a Hub dataset file: write hf://datasets/OWNER/NAME/PATH (optionally "
                    f"NAME@REVISION and #FIELD), the path of one file inside the dataset")
        path = match["path"]
    else:
        path = _local(source, relative_to)
        if not Path(path).is_file():
            return f"{path} is not a file"
    if path.lower().endswith(".arrow"):
        return f"{path} is an Arrow file, which the studio does not read: give the dataset's .parquet or .jsonl file"
    if path.lower().endswith(".parquet") and not _has_pyarrow():
        return (f"{path} is Parquet, which needs pyarrow: `pip install pyarrow` (the studio does not install it), "
                f"or give the dataset's .jsonl or .json file")
    return None


def _has_pyarrow() -> bool:
    try:
        return importlib.util.find_spec("pyarrow") is not None
    except ValueError:  # a module without a spec (set to None in sys.modules) cannot be imported either
        return False


def read_text(source: str, relative_to: Path | None = None, max_chars: int = MAX_CHARS) -> str:
    """The text of `source` (a path, relative to `relative_to` if given, or a Hub dataset file); a StudioError
    says why not, without context (the caller names the field)."""
    problem = source_problem(source, relative_to)
    if problem:
        raise StudioError(problem)
    source, field = _field_of(source)
    if is_hub(source):
        match = _HUB.match(source)
        path = _download(match["repo"], match["path"], match["revision"])
    else:
        path = Path(_local(source, relative_to))
    try:
        if path.suffix.lower() in RECORDS:
            return _records_text(path, field, max_chars)
        return _plain_text(path, max_chars)
    except (OSError, UnicodeDecodeError) as exc:
        raise StudioError(f"cannot read {path} ({exc}); give UTF-8 text, JSON, JSON Lines or Parquet") from None


def _field_of(source: str) -> tuple[str, str | None]:
    """`data.jsonl#text` -> ("data.jsonl", "text"); a `#` elsewhere is part of the name."""
    match = _FIELD.match(source)
    return (match["file"], match["field"]) if match else (source, None)


def _local(source: str, relative_to: Path | None) -> str:
    path = Path(source).expanduser()
    return str(path if relative_to is None or path.is_absolute() else relative_to / path)


def _download(repo: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo, filename, repo_type="dataset", revision=revision))
    except Exception as exc:  # huggingface_hub raises many types; each becomes one readable sentence
        raise StudioError(_hub_reason(repo, filename, revision, exc)) from exc


def _hub_reason(repo: str, filename: str, revision: str | None, exc: Exception) -> str:
    from huggingface_hub import errors

    where = f"dataset {repo!r}" + (f" at revision {revision!r}" if revision else "")
    if isinstance(exc, errors.GatedRepoError):
        return f"{where} is gated: accept its terms on the Hub, then set HF_TOKEN to a token of that account"
    if isinstance(exc, errors.RepositoryNotFoundError):
        return f"{where} was not found on the Hub (or is private: set HF_TOKEN)"
    if isinstance(exc, errors.RevisionNotFoundError):
        return f"{where} has no such revision"
    if isinstance(exc, errors.LocalEntryNotFoundError):  # before its parent class, EntryNotFoundError
        return (f"{filename!r} of {where} is not in the local Hub cache, and it could not be downloaded (Hub "
                f"access is off, HF_HUB_OFFLINE=1, or there is no network); download it, or give a local file")
    if isinstance(exc, errors.EntryNotFoundError):
        return f"{where} has no file {filename!r}: give the path of a file as the dataset's Files tab lists it"
    return f"{filename!r} of {where} could not be fetched ({type(exc).__name__}); check the network connection"


def _plain_text(path: Path, max_chars: int) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read(max_chars)


def _records_text(path: Path, field: str | None, max_chars: int) -> str:
    texts, size = [], 0
    for number, record in _records(path):
        text = _record_text(record, field, path, number)
        texts.append(text)
        size += len(text)
        if size >= max_chars:
            break
    if not texts:
        raise StudioError(f"{path} holds no records")
    return "\n\n".join(texts)


def _records(path: Path):
    """(record number, record) of a JSON Lines, JSON or Parquet file."""
    if path.suffix.lower() == ".parquet":
        yield from enumerate(_parquet_rows(path), 1)
        return
    if path.suffix.lower() == ".jsonl":
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if line.strip():
                    yield number, _json(line, path, f"line {number}")
        return
    data = _json(path.read_text(encoding="utf-8"), path, "the file")
    if isinstance(data, dict):  # {"data": [...]}, {"train": [...]}: the first list of records inside
        data = next((value for value in data.values() if isinstance(value, list)), [data])
    yield from enumerate(data if isinstance(data, list) else [data], 1)


def _parquet_rows(path: Path):
    """The rows of a Parquet file as dicts, a batch at a time (a file of gigabytes is never read whole)."""
    import pyarrow
    import pyarrow.parquet

    try:
        for batch in pyarrow.parquet.ParquetFile(path).iter_batches(batch_size=256):
            yield from batch.to_pylist()
    except pyarrow.ArrowException as exc:
        raise StudioError(f"{path} is not a readable Parquet file ({exc})") from None


def _json(text: str, path: Path, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StudioError(f"{path}: {where} is not valid JSON ({exc.msg})") from None


def _record_text(record, field: str | None, path: Path, number: int) -> str:
    if field is not None:
        if not isinstance(record, dict) or field not in record:
            keys = sorted(record) if isinstance(record, dict) else []
            raise StudioError(f"{path}: record {number} has no field {field!r} (its fields: {', '.join(keys)})")
        record = record[field]
    return "\n".join(_strings(record))


def _strings(value) -> list[str]:
    """Every string inside a JSON value, in order."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [text for item in value for text in _strings(item)]
    return []
