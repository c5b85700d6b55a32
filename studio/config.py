"""The mergekit-moe config: schema, YAML in and out, and the rules a config must follow.

The format is mergekit-moe's, field for field, so configs from model cards and guides work unchanged.
What we add is strictness: unknown keys and unknown gate modes are errors with a suggestion, where
mergekit drops the key silently or crashes later.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from studio import safe_yaml
from studio.errors import StudioError
from studio.gate_modes import ALIASES, MODES, gate_mode
from studio.text_sources import source_problem

GATE_MODES = tuple(MODES)
PROMPT_FORMATS = ("raw", "chat")
DTYPES = ("bfloat16", "float16", "float32")
# Router prompts are short; the hidden-state pass holds a square of a prompt's length (a 1 MB prompt asked for 93 GB).
MAX_PROMPT_CHARS = 20_000
# Public guides write `merge_method: moe` in mergekit-moe configs; mergekit-moe reads no such key and merges them.
MOE_MERGE_METHOD = "moe"
MERGE_METHOD_NOTE = ("`merge_method: moe` is ignored, as mergekit-moe ignores it: an MoE config always makes an MoE "
                     "merge (the line can go).")
# Measured with benchmarks/gate_modes.py's `sentences` config under `expert_text` (README, "Routers from the prompts
# people write"): 87/87/67/73% of the code/math/stories/chat gains with one expert per token, 92/95/86/84% with two.
ONE_EXPERT_PER_TOKEN_NOTE = (
    "`experts_per_token: 1` sends each token to a single expert, so a token sent to the wrong one loses all of its "
    "expert's gain: on the bundled zoo with natural prompts, 1 keeps 67% to 87% of the experts' gains where 2 keeps "
    "84% to 95%. Use 2 (Mixtral's and mergekit's default) unless the compute of a second expert is out of reach.")

# Keys that belong to other tools' configs, with what to tell the user instead of "unknown key".
FOREIGN_KEYS = {
    "models": "this looks like a mergekit-yaml config; MoE configs list experts under `experts:`",
    "slices": "this looks like a mergekit-yaml config; MoE configs list experts under `experts:`",
    "tokenizer_source": "MoE configs have no tokenizer field: the base model's tokenizer is always used",
    "tokenizer": "MoE configs have no tokenizer field: the base model's tokenizer is always used",
    "chat_template": "MoE configs have no chat_template field: the base model's template is copied",
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Expert(_Strict):
    """One expert: the model whose MLPs it takes, and the prompts its router row is built from."""

    source_model: str = Field(min_length=1)
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    # Finite and bounded: NaN, Inf or 1e40 would be written into the experts without a word.
    noise_scale: float | None = Field(default=None, ge=0, le=100, allow_inf_nan=False)
    residual_scale: float | None = Field(default=None, ge=-100, le=100, allow_inf_nan=False)
    # The studio's own, read by `gate_mode: expert_text`: text files of this expert's domain to fit its router on,
    # instead of text the expert writes from its prompts. mergekit-moe does not know the key.
    calibration_text: list[str] | None = None

    @field_validator("positive_prompts", "negative_prompts", "calibration_text", mode="before")
    @classmethod
    def _one_prompt_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("noise_scale", "residual_scale", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        # PyYAML reads `1e-3` (no dot) as a string, which mergekit accepts as a number, so strings stay allowed.
        if isinstance(value, bool):
            raise ValueError("must be a number, not true or false")
        return value


class MoEConfig(_Strict):
    """A mergekit-moe configuration (the YAML given to `mergekit-moe` or `python -m studio merge`)."""

    base_model: str = Field(min_length=1)
    architecture: str | None = None
    gate_mode: str = "hidden"
    dtype: str | None = None
    experts_per_token: int = Field(default=2, ge=1, strict=True)  # strict: `true` is not 1
    # The studio's own: "chat" wraps every prompt in the base tokenizer's chat template, as a user turn, so the
    # routers are built from text shaped like real chats (mergekit uses the raw prompt after BOS).
    prompt_format: str = "raw"
    experts: list[Expert] = Field(min_length=1)
    shared_experts: list[Expert] | None = None
    # Accepted only as `moe` (see MOE_MERGE_METHOD); kept so that the config is written back as it was given.
    merge_method: str | None = None

    @field_validator("merge_method")
    @classmethod
    def _moe_merge_method(cls, value: str | None) -> str | None:
        if value is not None and value != MOE_MERGE_METHOD:
            raise ValueError(f"this looks like a mergekit-yaml config (merge method {safe_yaml.excerpt(value)}); "
                             f"MoE configs have base_model and experts, and no merge method but `moe`")
        return value

    @field_validator("gate_mode")
    @classmethod
    def _known_gate_mode(cls, value: str) -> str:
        value = ALIASES.get(value, value)
        if value not in GATE_MODES:
            raise ValueError(f"unknown gate mode {safe_yaml.excerpt(value)}{_suggest(value, GATE_MODES)}; "
                             f"choose one of {', '.join(GATE_MODES)}")
        return value

    @field_validator("prompt_format")
    @classmethod
    def _known_prompt_format(cls, value: str) -> str:
        if value not in PROMPT_FORMATS:
            raise ValueError(f"unknown prompt format {safe_yaml.excerpt(value)}{_suggest(value, PROMPT_FORMATS)}; "
                             f"choose one of {', '.join(PROMPT_FORMATS)}")
        return value

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.removeprefix("torch.")
        if value not in DTYPES:
            raise ValueError(f"unknown dtype {safe_yaml.excerpt(value)}{_suggest(value, DTYPES)}; "
                             f"choose one of {', '.join(DTYPES)}")
        return value

    @property
    def all_experts(self) -> list[Expert]:
        """Routed experts first, then shared ones: the order gate rows are computed in."""
        return self.experts + (self.shared_experts or [])

    def model_refs(self) -> list[str]:
        """Every distinct model the merge reads, base first."""
        refs = [self.base_model] + [e.source_model for e in self.all_experts]
        return list(dict.fromkeys(refs))


def _suggest(word: str, choices: tuple[str, ...] | list[str]) -> str:
    if len(word) > 100:  # no key or mode is that long, and difflib is slow on long words
        return ""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.5)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _field_names(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _describe(error: dict[str, Any]) -> str:
    loc = error["loc"]
    where = safe_yaml.shorten("".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip("."))
    if error["type"] == "extra_forbidden":
        key = safe_yaml.shorten(str(loc[-1]))
        if key in FOREIGN_KEYS:
            return f"`{where}`: unknown key; {FOREIGN_KEYS[key]}."
        in_expert = len(loc) > 1 and loc[0] in ("experts", "shared_experts")
        fields = _field_names(Expert if in_expert else MoEConfig)
        return f"`{where}`: unknown key{_suggest(key, fields)}. Allowed here: {', '.join(fields)}."
    if error["type"] == "missing":
        return f"`{where}`: required field is missing."
    message = error["msg"].removeprefix("Value error, ")
    return f"`{where}`: {message} (got {safe_yaml.excerpt(error.get('input'))})." if where else f"{message}."


def parse_config(data: Any, source: str = "config") -> MoEConfig:
    """Build a config from already-parsed YAML, turning schema errors into one readable message."""
    if not isinstance(data, dict):
        raise StudioError(f"{source}: expected a mapping with `base_model` and `experts`, got {type(data).__name__}.")
    problems = validation_errors(data)
    if problems:
        lines = "\n".join(f"  - {message}" for _, message in problems)
        raise StudioError(f"{source} is not a valid MoE config:\n{lines}")
    return MoEConfig.model_validate(data)


def validation_errors(data: dict) -> list[tuple[tuple[str | int, ...], str]]:
    """Every schema error of a config mapping, as (location, readable message); empty when it is valid."""
    try:
        MoEConfig.model_validate(data)
    except ValidationError as exc:
        return [(tuple(e["loc"]), _describe(e)) for e in exc.errors()]
    return []


def load_yaml(text: str, source: str = "config") -> MoEConfig:
    """Parse YAML text into a config (with limits on size, nesting and aliases; duplicate keys refused)."""
    return parse_config(safe_yaml.load(text, source), source)


def load_config(path: str | Path) -> MoEConfig:
    """Read a YAML config file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read(safe_yaml.MAX_BYTES + 1)  # at most that: /dev/zero or a huge file is refused, not read
    except OSError as exc:
        raise StudioError(f"Cannot read config file {path}: {exc.strerror}.") from None
    if len(data) > safe_yaml.MAX_BYTES:
        raise StudioError(f"{path} is more than {safe_yaml.MAX_BYTES:,} bytes; a config is at most that. Is it the "
                          f"right file?")
    return load_yaml(safe_yaml.decode(data, str(path)), str(path))


class _Dumper(yaml.SafeDumper):
    """Writes multi-line strings (ChatML prompts, code) as literal blocks, the way people write them."""


_Dumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def to_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=120)


def dump_yaml(config: MoEConfig) -> str:
    """The config as mergekit-moe YAML; `load_yaml(dump_yaml(c)) == c`."""
    data = config.model_dump(exclude_none=True)
    for key, default in (("experts_per_token", 2), ("prompt_format", "raw")):
        if data.get(key) == default:
            data.pop(key)
    return to_yaml(data)


def experts_with_gates(config: MoEConfig) -> list[Expert]:
    """Routed experts, then shared experts that get a gate (prompted ones, or any under random modes)."""
    shared = [e for e in config.shared_experts or []
              if e.positive_prompts or not gate_mode(config.gate_mode).needs_prompts]
    return config.experts + shared


def _prompt_key(expert: Expert) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return tuple(expert.positive_prompts or ()), tuple(expert.negative_prompts or ())


def _prompts(config: MoEConfig):
    """(location, prompt) for every prompt of the config."""
    for group in ("experts", "shared_experts"):
        for i, expert in enumerate(getattr(config, group) or []):
            for kind in ("positive_prompts", "negative_prompts"):
                for j, prompt in enumerate(getattr(expert, kind) or []):
                    yield f"{group}[{i}].{kind}[{j}]", prompt


def check_rules(config: MoEConfig, allow_identical_experts: bool = False) -> tuple[list[str], list[str]]:
    """mergekit-moe's config rules, as (errors, warnings). Model files are checked elsewhere."""
    errors: list[str] = []
    warnings: list[str] = []
    n = len(config.experts)
    if n < config.experts_per_token:
        errors.append(f"`experts_per_token` is {config.experts_per_token} but there are only {n} experts; "
                      f"lower it or add experts.")
    if n & (n - 1):
        warnings.append(f"{n} experts is not a power of two; llama.cpp cannot run such a model.")
    if config.experts_per_token == 1 and n > 1:
        warnings.append(ONE_EXPERT_PER_TOKEN_NOTE)
    shared = config.shared_experts or []
    if len(shared) > 1:
        errors.append(f"`shared_experts` has {len(shared)} entries; at most one shared expert is supported.")

    for where, prompt in _prompts(config):
        if len(prompt) > MAX_PROMPT_CHARS:
            errors.append(f"`{where}` is {len(prompt):,} characters long; a router prompt is at most "
                          f"{MAX_PROMPT_CHARS:,} (the hidden-state pass needs memory growing with the square of a "
                          f"prompt's length). Use a shorter, typical piece of the domain.")
    mode = gate_mode(config.gate_mode)
    if mode.needs_prompts:
        for i, expert in enumerate(config.experts):
            if not expert.positive_prompts:
                errors.append(f"`experts[{i}]` ({expert.source_model}) has no `positive_prompts`; gate mode "
                              f"{config.gate_mode!r} builds its router row from them. Add some, or use "
                              f"`gate_mode: random`.")
        if n > 1 and len({_prompt_key(e) for e in config.experts}) == 1:
            errors.append("Every expert has the same prompts, so the router could not tell them apart. Give each "
                          "expert prompts of its own, or use `gate_mode: random`.")
        if n > 1 and len({e.source_model for e in config.experts}) == 1 and not allow_identical_experts:
            errors.append(f"Every expert is {config.experts[0].source_model}: identical experts are useless without "
                          f"training. Pass --i-understand-this-is-not-useful-without-training if you will "
                          f"train the result, or use `gate_mode: random`.")
    if mode.runs == "merged" and any(e.positive_prompts for e in shared):
        errors.append(f"`gate_mode: {mode.name}` fits the routers of the routed experts, not a shared expert's gate: "
                      "give the shared expert no prompts (it then sees every token, ungated), or use "
                      "`gate_mode: hidden`.")
    texts = [i for i, e in enumerate(config.experts) if e.calibration_text]
    if texts and not mode.reads_expert_text:
        errors.append(f"`experts[{texts[0]}].calibration_text` is read only by `gate_mode: expert_text`; set that "
                      f"mode, or remove the key.")
    if shared and len({bool(e.positive_prompts) for e in shared}) > 1:
        errors.append("Shared experts must all have prompts or all have none.")
    errors += _missing_calibration_text(config)
    if config.merge_method is not None:
        warnings.append(MERGE_METHOD_NOTE)
    return errors, warnings


def _missing_calibration_text(config: MoEConfig) -> list[str]:
    """`calibration_text` sources that cannot be read (a missing file, a malformed Hub URL): named now, not after
    the models are downloaded."""
    problems = [(i, expert, source_problem(name)) for i, expert in enumerate(config.experts)
                for name in expert.calibration_text or []]
    return [f"`experts[{i}].calibration_text` ({expert.source_model}): {problem}. Give text files of this expert's "
            f"domain (UTF-8 text, JSON Lines, JSON or Parquet), local or hf://datasets/OWNER/NAME/FILE."
            for i, expert, problem in problems if problem]
