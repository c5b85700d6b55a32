"""The Build tab's form as plain data: edits of a config mapping, and each problem keyed by the field it is about.

The form and the YAML editor share one mapping (what `yaml.safe_load` gives for the editor's text). A form
edit changes the mapping and the YAML is written from it; a YAML edit replaces the mapping and the form is
read from it. Nothing here knows about widgets, so the round trip is tested without a browser.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

from studio import safe_yaml
from studio.config import MoEConfig, check_rules, to_yaml, validation_errors
from studio.errors import StudioError

# Prompts may span lines (code, chat turns), so a line holding only `---` separates them in a text box.
PROMPT_SEPARATOR = "\n---\n"
SETTINGS = ("gate_mode", "dtype", "experts_per_token", "architecture", "prompt_format")
FIRST_NAME = re.compile(r"`([a-z_]+(?:\[\d+\])?)")


def prompts_to_text(prompts: list[str] | str | None) -> str:
    if isinstance(prompts, str):
        return prompts
    return PROMPT_SEPARATOR.join(prompts or [])


def text_to_files(text: str | None) -> list[str] | None:
    """File paths, one per line of a text box (blank lines and surrounding spaces ignored); None when there is
    none."""
    files = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return files or None


def text_to_prompts(text: str | None) -> list[str] | None:
    """The prompts in a text box; None when it is empty (the key then leaves the config)."""
    text = (text or "").replace("\r\n", "\n")
    if not text.strip():
        return None
    return [p for p in text.split(PROMPT_SEPARATOR) if p]  # a prompt of spaces (an indent) is a prompt


def parse_mapping(text: str) -> dict:
    """The editor's YAML as a mapping, or StudioError saying why it is not one."""
    data = safe_yaml.load(text, "The YAML", "does not parse")  # the editor's text has the config file's limits
    if not isinstance(data, dict):
        raise StudioError("The YAML must be a mapping with `base_model` and `experts`.")
    return data


def _set(mapping: dict, key: str, value: Any) -> None:
    if value is None or value == "" or value == []:
        mapping.pop(key, None)
    else:
        mapping[key] = value


def _experts(data: dict, key: str = "experts") -> list:
    experts = data.get(key)
    return experts if isinstance(experts, list) else []


def set_field(data: dict, key: str, value: Any) -> dict:
    """A top-level field (base_model, gate_mode, ...); an empty value removes the key."""
    data = copy.deepcopy(data)
    if key == "experts_per_token" and value is not None:
        value = int(value)
    _set(data, key, value)
    return data


def set_expert_field(data: dict, index: int, key: str, value: Any, group: str = "experts") -> dict:
    """One field of expert `index` (prompts as text, split at `---` lines). group "shared_experts" edits the
    shared expert; an empty shared source model removes the shared expert."""
    data = copy.deepcopy(data)
    if key.endswith("_prompts"):
        value = text_to_prompts(value)
    elif key == "calibration_text":
        value = text_to_files(value)
    experts = _experts(data, group)
    if group == "shared_experts" and not experts:
        if not value:
            return data
        experts = data[group] = [{}]
    if not 0 <= index < len(experts) or not isinstance(experts[index], dict):
        raise StudioError(f"There is no {group}[{index}] to edit.")
    _set(experts[index], key, value)
    if group == "shared_experts" and not experts[index].get("source_model"):
        data.pop(group)
    return data


def add_expert(data: dict) -> dict:
    """A new last expert, a copy of the base model until its source model is chosen."""
    data = copy.deepcopy(data)
    data["experts"] = _experts(data) + [{"source_model": str(data.get("base_model") or "")}]
    return data


def remove_expert(data: dict, index: int) -> dict:
    data = copy.deepcopy(data)
    experts = _experts(data)
    if 0 <= index < len(experts):
        experts.pop(index)
    data["experts"] = experts
    return data


def move_expert(data: dict, index: int, step: int) -> dict:
    """Expert `index` moved `step` places (-1 up, +1 down); a move past either end does nothing."""
    data = copy.deepcopy(data)
    experts = _experts(data)
    target = index + step
    if 0 <= index < len(experts) and 0 <= target < len(experts):
        experts[index], experts[target] = experts[target], experts[index]
    return data


def expert_names(data: dict) -> list[str]:
    """Choices of the expert picker: position and source model."""
    return [f"{i}: {e.get('source_model', '?') if isinstance(e, dict) else '?'}" for i, e in enumerate(_experts(data))]


@dataclass(frozen=True)
class ExpertView:
    source_model: str = ""
    positive_prompts: str = ""
    negative_prompts: str = ""
    noise_scale: float | None = None
    residual_scale: float | None = None
    calibration_text: str = ""  # one file per line


def expert_view(data: dict, index: int, group: str = "experts") -> ExpertView:
    """The form's fields for one expert (empty when there is none)."""
    experts = _experts(data, group)
    expert = experts[index] if 0 <= index < len(experts) and isinstance(experts[index], dict) else {}
    files = expert.get("calibration_text")
    return ExpertView(source_model=str(expert.get("source_model") or ""),
                      positive_prompts=prompts_to_text(expert.get("positive_prompts")),
                      negative_prompts=prompts_to_text(expert.get("negative_prompts")),
                      noise_scale=expert.get("noise_scale"), residual_scale=expert.get("residual_scale"),
                      calibration_text="\n".join(files) if isinstance(files, list) else str(files or ""))


def field_problems(data: dict, allow_identical_experts: bool = False) -> dict[str, list[str]]:
    """Each schema error and rule broken, keyed by where it belongs: "base_model", a setting ("gate_mode", ...),
    "experts[i]", "experts" (the set of experts), "shared_experts", or "" (the whole config)."""
    problems: dict[str, list[str]] = {}
    schema = validation_errors(data)
    for loc, message in schema:
        key = f"{loc[0]}[{loc[1]}]" if len(loc) > 1 and isinstance(loc[1], int) else str(loc[0]) if loc else ""
        problems.setdefault(key, []).append(message)
    if schema:
        return problems
    errors, warnings = check_rules(MoEConfig.model_validate(data), allow_identical_experts)
    for message in errors + [f"Warning: {w}" for w in warnings]:
        match = FIRST_NAME.search(message)
        problems.setdefault(match[1] if match else "experts", []).append(message)
    return problems


def messages_by_area(problems: dict[str, list[str]], selected: int) -> dict[str, str]:
    """Markdown for the message spot under each part of the form: base, settings, experts (the list and the
    experts not on screen), expert (the one on screen), shared, config (anything else)."""
    areas = {"base": [], "settings": [], "experts": [], "expert": [], "shared": [], "config": []}
    for key, messages in problems.items():
        name = key.split("[")[0]
        if key == f"experts[{selected}]":
            area = "expert"
        elif name == "base_model":
            area = "base"
        elif name in SETTINGS:
            area = "settings"
        elif name == "experts":
            area = "experts"
        elif name == "shared_experts":
            area = "shared"
        else:
            area = "config"
        areas[area] += messages
    return {area: "\n".join(f"- {m}" for m in messages) for area, messages in areas.items()}


def rewritten_yaml(old_text: str, data: dict) -> tuple[str, str]:
    """The YAML of `data` after a form edit, keeping the comment block at the top of `old_text` (where presets
    explain themselves); and, when `old_text` had comments further down, a note saying they were dropped."""
    lines = old_text.replace("\r\n", "\n").split("\n")
    top = 0
    while top < len(lines) and (lines[top].lstrip().startswith("#") or not lines[top].strip()):
        top += 1
    header = "\n".join(line for line in lines[:top] if line.strip()) + "\n" if top else ""
    dropped = [number for number, line in enumerate(lines[top:], start=top + 1) if _has_comment(line)]
    note = (f"- The form rewrote the YAML: the comments on line{'s' if len(dropped) > 1 else ''} "
            f"{', '.join(map(str, dropped))} were dropped (the comment block at the top is kept)." if dropped else "")
    return header + to_yaml(data), note


def _has_comment(line: str) -> bool:
    """A `#` that starts a YAML comment: at the line's start, or after a space outside quotes."""
    for match in re.finditer(r"(?:^|\s)#", line):
        before = line[:match.start()]
        if before.count('"') % 2 == 0 and before.count("'") % 2 == 0:
            return True
    return False
