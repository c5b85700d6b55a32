"""The workspace folder: the merges finished in it, and what each one was built from."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from studio.config import load_config
from studio.errors import StudioError
from studio.formatting import human_bytes

MERGE_CONFIG = "mergekit_moe_config.yml"


@dataclass(frozen=True)
class FinishedMerge:
    path: Path
    experts: list[str]
    size_bytes: int
    modified: float

    def row(self) -> list[str]:
        return [self.path.name, str(len(self.experts)), human_bytes(self.size_bytes),
                time.strftime("%Y-%m-%d %H:%M", time.localtime(self.modified)), str(self.path)]


MERGE_HEADERS = ["name", "experts", "size", "finished", "path"]


def output_folder(workspace: Path, name: str) -> Path:
    """A new merge's folder: a plain name inside the workspace (no path, not hidden)."""
    name = name.strip()
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise StudioError(f"Output name {name!r}: use a plain folder name such as `my-moe`; merges go into "
                          f"{workspace}.")
    return Path(workspace) / name


def finished_merges(workspace: Path) -> list[FinishedMerge]:
    """Every merge in the workspace, newest first. Half-written merges live in hidden folders and are skipped."""
    merges = []
    for folder in Path(workspace).iterdir() if Path(workspace).is_dir() else []:
        config = folder / MERGE_CONFIG
        if folder.name.startswith(".") or not (folder / "config.json").is_file() or not config.is_file():
            continue
        try:
            experts = [e.source_model for e in load_config(config).experts]
        except StudioError:
            continue  # not one of ours, or edited by hand: not listed rather than failing the whole list
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        merges.append(FinishedMerge(folder, experts, size, config.stat().st_mtime))
    return sorted(merges, key=lambda m: m.modified, reverse=True)


def expert_prompts(model: str | Path) -> dict[str, list[str]]:
    """Each expert's positive prompts, by source model, from a merge's config (empty for other models)."""
    config = Path(model) / MERGE_CONFIG
    if not config.is_file():
        return {}
    prompts: dict[str, list[str]] = {}
    for expert in load_config(config).experts:
        prompts.setdefault(expert.source_model, []).extend(expert.positive_prompts or [])
    return {name: texts for name, texts in prompts.items() if texts}
