"""A merge's progress bar: each stage's share of the bar, and a label a person reads.

A merge reports `Progress` events per stage: "open", "download" (Hub files), the gate pass's phases ("hidden",
"text", "fit"; each mode's shares in studio/gate_modes.py) and "write" (bytes of the weights). The router pass runs
while the weights are written, so the bar adds up every stage's done share, and the label names each stage under
way.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from studio import gate_modes
from studio.build.merge import Progress
from studio.config import MoEConfig
from studio.errors import StudioError
from studio.sources import ModelRef

DOWNLOAD_SHARE = 0.3  # of the bar, when a model comes from the Hub (nothing, once it is in the cache)
FINISH_SHARE = 0.02  # the last checks of the written files and the move into place: the bar is full once done


@dataclass
class MergeBar:
    """The bar of one merge: feed it every Progress; read `fraction` and `label`."""

    shares: dict[str, float]
    latest: dict[str, Progress] = field(default_factory=dict)

    @classmethod
    def for_config(cls, config: MoEConfig) -> "MergeBar":
        """The bar of merging `config`: its gate mode's phases, and a share for downloads when a model is on the Hub."""
        return cls.for_merge(config.gate_mode, any(_from_hub(ref) for ref in config.model_refs()))

    @classmethod
    def for_merge(cls, gate_mode: str, from_hub: bool) -> "MergeBar":
        phases = dict(gate_modes.gate_mode(gate_mode).phases)  # a config's mode is always a known one
        shares = {**phases, "write": 1.0 - FINISH_SHARE - sum(phases.values()), "done": FINISH_SHARE}
        scale = 1.0 - DOWNLOAD_SHARE if from_hub else 1.0
        shares = {name: share * scale for name, share in shares.items()}
        return cls({"download": DOWNLOAD_SHARE, **shares} if from_hub else shares)

    def update(self, progress: Progress) -> None:
        self.latest[progress.stage] = progress

    def _done(self, stage: str) -> float:
        """How much of a stage is done; the download is over once any later stage began."""
        if stage == "download" and set(self.latest) & (set(self.shares) - {"download"}):
            return 1.0
        progress = self.latest.get(stage)
        if progress is None or not progress.total:  # not begun, or its size not known yet
            return 0.0
        return min(progress.fraction, 1.0)

    @property
    def fraction(self) -> float:
        return sum(share * self._done(stage) for stage, share in self.shares.items())

    @property
    def label(self) -> str:
        """The stages under way, in words: "Hidden states of the prompts: layer 2 of 4 · Writing 1 of 1 file, ..."."""
        running = [self.latest[s].message for s in self.shares if s in self.latest and self._done(s) < 1.0]
        phases = set(self.shares) - {"download", "write", "done"}
        if phases and "write" in self.latest and not phases & set(self.latest):
            running.insert(0, "Router pass: preparing")
        if running:
            return " · ".join(running)
        if "done" in self.latest:
            return self.latest["done"].message
        if self.latest.keys() - {"open"}:
            return "Checking the files and moving them into place"
        return self.latest["open"].message if "open" in self.latest else "Starting"


def _from_hub(ref: str) -> bool:
    try:
        return not ModelRef.parse(ref).is_local
    except StudioError:  # the merge itself names the reference's problem
        return False
