"""Domain text from a local file or a file of a Hub dataset: the one reader of `calibration_text` and of the
texts that `quality` scores.

A source is a path, or a Hub dataset's file: `hf://datasets/OWNER/NAME[@REVISION]/PATH` (parsed by
huggingface_hub, so special revisions such as `refs/convert/parquet` work) or the file's web address as the
Hub's Files tab shows it. `#FIELD` at the end picks one field of each record. What the file holds decides how it
is read:
  * `.jsonl` (one JSON record per line), `.json` (a list of records, or an object holding one) and `.parquet`
    (rows; needs pyarrow, which the studio does not install: `pip install pyarrow`): each record's text is its
    FIELD when one is given, else every string inside it in order (an instruction and its answer, or a chat's
    messages); records without text are skipped, and the rest are separated by a blank line;
  * anything else is UTF-8 text (Arrow files of a `datasets` cache are refused: give the dataset's own files).

Downloads go through huggingface_hub, whose cache, token (HF_TOKEN or the login) and offline switch
(HF_HUB_OFFLINE=1) apply; the token is never printed. At most MAX_CHARS characters are returned. JSON Lines and
Parquet are read a record (a batch of rows) at a time, so a dataset of gigabytes costs its download, not its size
in memory; a `.json` file is parsed whole, so one above JSON_MAX_BYTES is refused.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from studio.errors import StudioError
from studio.hub_errors import hub_failure

HUB_PREFIXES = ("hf://", "https://huggingface.co/", "https://hf.co/")
MAX_CHARS = 4_000_000  # far more than a router fit (6144 tokens per expert) or a quality run (16384) reads
JSON_MAX_BYTES = 256 * 2**20
RECORDS = (".jsonl", ".json", ".parquet")
HUB_FORM = "hf://datasets/OWNER/NAME/FILE"


@dataclass(frozen=True)
class _Source:
    name: str  # as the user wrote it: what messages name
    path: str  # a local path, or the path inside the dataset
    field: str | None = None
    repo: str | None = None  # the Hub dataset, for a Hub source
    revision: str | None = None


def source_problem(source: str, relative_to: Path | None = None) -> str | None:
    """What is wrong with `source` before anything is downloaded, or None."""
    try:
        _checked(source, relative_to)
    except StudioError as exc:
        return str(exc)
    return None


def read_text(source: str, relative_to: Path | None = None, max_chars: int = MAX_CHARS) -> str:
    """The text of `source` (a path, relative to `relative_to` if given, or a Hub dataset's file); a StudioError
    says why not, without context (the caller names the field)."""
    parsed = _checked(source, relative_to)
    path = Path(parsed.path) if parsed.repo is None else _download(parsed)
    label = parsed.name.partition("#")[0] if parsed.repo else str(path)
    try:
        if path.suffix.lower() in RECORDS:
            return _records_text(path, parsed.field, label, max_chars)
        with open(path, encoding="utf-8") as file:
            return file.read(max_chars)
    except (OSError, UnicodeDecodeError) as exc:
        raise StudioError(f"cannot read {label} ({exc}); give UTF-8 text, JSON, JSON Lines or Parquet") from None


def _checked(source: str, relative_to: Path | None) -> _Source:
    parsed = _parsed(source, relative_to)
    suffix = Path(parsed.path).suffix.lower()
    if parsed.repo is None and not Path(parsed.path).is_file():
        raise StudioError(f"{parsed.path} is not a file")
    if parsed.field is not None and suffix not in RECORDS:
        raise StudioError(f"{source}: #{parsed.field} picks a field of JSON Lines, JSON or Parquet records, and "
                          f"this file is read as plain text; drop #{parsed.field}")
    if suffix == ".arrow":
        raise StudioError(f"{source} is an Arrow file, which the studio does not read: give the dataset's .parquet "
                          f"or .jsonl file")
    if suffix == ".parquet" and not _has_pyarrow():
        raise StudioError(f"{source} is Parquet, which needs pyarrow: `pip install pyarrow` (the studio does not "
                          f"install it), or give the dataset's .jsonl or .json file")
    return parsed


def _parsed(source: str, relative_to: Path | None) -> _Source:
    if not source.startswith(HUB_PREFIXES):
        path = Path(source).expanduser()
        path = path if relative_to is None or path.is_absolute() else relative_to / path
        if path.is_file() or "#" not in path.name:  # an existing file keeps a '#' in its name
            return _Source(source, str(path))
        name, field = str(path).rsplit("#", 1)
        return _Source(source, name, field)
    from huggingface_hub import parse_hf_uri
    from huggingface_hub.errors import HfUriError

    location, _, field = source.partition("#")
    try:
        uri = parse_hf_uri(location)
    except HfUriError as exc:
        raise StudioError(f"{source} is not a Hub dataset's file ({exc}); write {HUB_FORM}") from None
    if uri.type != "dataset" or not uri.path_in_repo:
        raise StudioError(f"{source} is not a file of a Hub dataset: write {HUB_FORM} (`datasets/` and the file's "
                          f"path inside the dataset)")
    return _Source(source, uri.path_in_repo, field or None, uri.id, uri.revision)


def _has_pyarrow() -> bool:
    try:
        return importlib.util.find_spec("pyarrow") is not None
    except ValueError:  # a module without a spec (set to None in sys.modules) cannot be imported either
        return False


def _download(source: _Source) -> Path:
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(source.repo, source.path, repo_type="dataset", revision=source.revision))
    except Exception as exc:  # huggingface_hub raises many types; each becomes one readable sentence
        reason = hub_failure(f"dataset {source.repo!r}", exc, source.revision, source.path,
                             "give its path as the dataset's Files tab lists it")
        raise StudioError(f"{source.name}: {reason}") from exc


def _records_text(path: Path, field: str | None, label: str, max_chars: int) -> str:
    texts, size = [], 0
    for number, record in _records(path, field, label):
        text = _record_text(record, field, label, number)
        if text.strip():
            texts.append(text)
            size += len(text) + 2
            if size >= max_chars:
                break
    if not texts:
        raise StudioError(f"{label}: no record has text" + (f" in field {field!r}" if field else ""))
    return "\n\n".join(texts)[:max_chars]


def _records(path: Path, field: str | None, label: str):
    """(record number, record) of a JSON Lines, JSON or Parquet file."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from enumerate(_parquet_rows(path, field, label), 1)
    elif suffix == ".jsonl":
        with open(path, encoding="utf-8") as file:
            for number, line in enumerate(file, 1):
                if line.strip():
                    yield number, _json(line, label, f"line {number}")
    else:
        size = path.stat().st_size
        if size > JSON_MAX_BYTES:
            raise StudioError(f"{label} is a JSON file of {size / 2**20:.0f} MB, read whole to parse "
                              f"it; give the dataset's .jsonl or .parquet file, read a record at a time")
        data = _json(path.read_text(encoding="utf-8"), label, "the file")
        if isinstance(data, dict):  # {"version": ..., "data": [{...}, ...]}: its list of records
            data = next((value for value in data.values() if isinstance(value, list)
                         and any(isinstance(item, dict) for item in value)), [data])
        yield from enumerate(data if isinstance(data, list) else [data], 1)


def _parquet_rows(path: Path, field: str | None, label: str):
    """The rows of a Parquet file as dicts, a batch at a time; with a field, only its column is decoded (a dataset's
    images or audio are never read for its text)."""
    import pyarrow
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.ParquetFile(path)
        columns = table.schema_arrow.names
        if field is not None and field not in columns:
            raise StudioError(f"{label} has no column {field!r} (its columns: {', '.join(columns)})")
        for batch in table.iter_batches(batch_size=256, columns=None if field is None else [field]):
            yield from batch.to_pylist()
    except pyarrow.ArrowException as exc:
        raise StudioError(f"{label} is not a readable Parquet file ({exc})") from None


def _json(text: str, label: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise StudioError(f"{label}: {where} is not valid JSON ({exc.msg})") from None


def _record_text(record, field: str | None, label: str, number: int) -> str:
    if field is not None:
        if not isinstance(record, dict):
            raise StudioError(f"{label}: record {number} is not an object, so it has no field {field!r}")
        if field not in record:
            raise StudioError(f"{label}: record {number} has no field {field!r} (its fields: "
                              f"{', '.join(sorted(record))})")
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
