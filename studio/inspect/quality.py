"""How much of each expert's gain the merged MoE keeps, measured on held-out text of each expert's domain.

For every domain: the mean next-token loss (nats per token) of the dense base, of the expert alone, and of the
MoE, and the share of the expert's gain over the base that the MoE recovers, (base - MoE) / (base - expert):
100% means the MoE is as good as the expert on its domain, 0% no better than the base, below 0 worse.
Routing numbers say whether prompts reach an expert; this says whether the MoE is any better for it.

Text per domain comes from a YAML file that maps each expert (index, source model or its folder name) to a list
of texts, each a string or `{file: path}` (relative to the YAML file, or a Hub dataset's file:
hf://datasets/OWNER/NAME/FILE, read as studio/text_sources.py says); or, for the bundled zoo, from its own
held-out corpora (`zoo`).
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from studio import safe_yaml
from studio.errors import StudioError
from studio.inspect.evaluate import resolve_expert
from studio.inspect.routing import expert_labels, load_moe
from studio.text_sources import read_text

WINDOW = 128  # tokens per scored window
MAX_TOKENS = 16_384  # per domain, to bound the time on large models


@dataclass
class DomainQuality:
    expert: str  # the expert's label (its source model)
    tokens: int
    base: float  # mean next-token loss of the dense base, nats per token
    expert_alone: float
    moe: float

    @property
    def recovered(self) -> float:
        """(base - MoE) / (base - expert); NaN when the expert is no better than the base here."""
        gain = self.base - self.expert_alone
        return (self.base - self.moe) / gain if gain > 1e-9 else math.nan


@dataclass
class QualityReport:
    domains: list[DomainQuality]

    def rows(self) -> list[list[str]]:
        return [[Path(d.expert).name, str(d.tokens), f"{d.base:.3f}", f"{d.expert_alone:.3f}", f"{d.moe:.3f}",
                 "n/a" if math.isnan(d.recovered) else f"{d.recovered:.0%}"] for d in self.domains]

    HEADERS = ["domain (expert)", "tokens", "base loss", "expert loss", "MoE loss", "expert's gain recovered"]

    def table(self) -> str:
        from studio.formatting import format_table

        return format_table(self.HEADERS, self.rows())


def scored_windows(ids: torch.Tensor, window: int = WINDOW) -> torch.Tensor:
    """(windows, window): the consecutive windows of `ids` that are scored (the tail that does not fill a window is
    left out, unless the text is shorter than one window)."""
    if len(ids) < 2:
        raise StudioError("The text to score holds fewer than two tokens; give more text for this domain.")
    usable = max((len(ids) - 1) // window * window, 0)
    return ids[:usable].view(-1, window) if usable else ids[None]


@torch.inference_mode()
def mean_loss(model, ids: torch.Tensor, window: int = WINDOW, batch: int = 16) -> float:
    """Mean next-token loss over the `scored_windows` of `ids`."""
    windows = scored_windows(ids, window)
    device = model.get_input_embeddings().weight.device
    losses = [model(input_ids=chunk.to(device), labels=chunk.to(device)).loss.float().item() * len(chunk)
              for chunk in windows.split(batch)]
    return sum(losses) / len(windows)


def load_texts(path: str | Path) -> dict[int | str, str]:
    """Expert -> its held-out text, from a YAML file (see the module docstring)."""
    path = Path(path)
    try:
        data = safe_yaml.load(safe_yaml.decode(path.read_bytes(), str(path)), str(path))
    except OSError as exc:
        raise StudioError(f"Cannot read the texts file {path}: {exc.strerror}.") from None
    if not isinstance(data, dict) or not data:
        raise StudioError(f"{path}: expected a mapping from expert (index, source model or folder name) to a list "
                          f"of texts, each a string or {{file: path}}.")
    return {key: _joined(key, value, path.parent) for key, value in data.items()}


def _joined(key, value, folder: Path) -> str:
    parts = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict) and set(item) == {"file"}:
            try:
                parts.append(read_text(str(item["file"]), relative_to=folder))
            except StudioError as exc:
                raise StudioError(f"Texts for {key!r}: {exc}.") from None
        elif isinstance(item, str):
            parts.append(item)
        else:
            raise StudioError(f"Texts for {key!r}: each item is a string or {{file: path}}, not {item!r}.")
    return "\n\n".join(parts)


def zoo_texts(tokenizer) -> dict[str, torch.Tensor]:
    """The bundled zoo's held-out text per domain, encoded: the same text as the zoo's loss table."""
    from studio.zoo.corpora import held_out_text_ids

    return held_out_text_ids(tokenizer)


def measure_quality(model_path: str | Path, texts: dict[int | str, str] | str,
                    max_tokens: int = MAX_TOKENS, trust_remote_code: bool = False,
                    log: Callable[[str], None] = print) -> QualityReport:
    """Score the MoE in `model_path`, its base and each expert named in `texts` (or "zoo") on that text.

    The base and experts are read from the merge's mergekit_moe_config.yml, one dense model at a time.
    """
    moe, tokenizer = load_moe(model_path, trust_remote_code=trust_remote_code)
    base, experts = _sources_of(Path(model_path))
    labels = expert_labels(model_path, len(experts))
    encoded = _zoo_domains_of(zoo_texts(tokenizer), labels) if texts == "zoo" else {
        key: torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"]) for key, text in texts.items()}
    wanted = {resolve_expert(key, labels): ids[:max_tokens] for key, ids in encoded.items()}
    log(f"Scoring the MoE on {len(wanted)} domains")
    moe_losses = {k: mean_loss(moe, ids) for k, ids in wanted.items()}
    del moe
    log(f"Scoring the base, {base}")
    base_losses = _losses_of(base, wanted, trust_remote_code)
    domains = []
    for k, ids in wanted.items():
        log(f"Scoring expert {k}, {experts[k]}")
        alone = _losses_of(experts[k], {k: ids}, trust_remote_code)[k]
        domains.append(DomainQuality(labels[k], len(ids), base_losses[k], alone, moe_losses[k]))
    return QualityReport(domains)


def _zoo_domains_of(texts: dict[str, torch.Tensor], labels: list[str]) -> dict[str, torch.Tensor]:
    """The zoo's domains whose expert is in the merge: a merge of some of the zoo's experts is scored on theirs.
    An expert is the zoo's by its folder's name (`.../math`), as `resolve_expert` names experts."""
    names = {Path(label).name for label in labels}
    present = {domain: ids for domain, ids in texts.items() if domain in names}
    if not present:
        raise StudioError(f"None of the zoo's domain experts ({', '.join(texts)}) is in this merge (its experts: "
                          f"{', '.join(labels)}), so `zoo` has no text to score it on; give texts of its domains.")
    return present


def _sources_of(folder: Path) -> tuple[str, list[str]]:
    config_file = folder / "mergekit_moe_config.yml"
    if not config_file.exists():
        raise StudioError(f"{folder} has no mergekit_moe_config.yml, so its base and experts are unknown; measure "
                          f"a merge made by the studio or mergekit-moe.")
    data = safe_yaml.load(config_file.read_text(encoding="utf-8"), str(config_file)) or {}
    return str(data.get("base_model")), [str(e.get("source_model")) for e in data.get("experts") or []]


def _losses_of(ref: str, texts: dict[int, torch.Tensor], trust_remote_code: bool) -> dict[int, float]:
    from transformers import AutoModelForCausalLM

    from studio.sources import open_model

    source = open_model(ref)
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code).eval()
    try:
        return {k: mean_loss(model, ids) for k, ids in texts.items()}
    finally:
        del model
        gc.collect()
