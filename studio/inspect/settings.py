"""How an answer is generated. Free of torch, so that the command line's --help can name the defaults."""

from __future__ import annotations

from dataclasses import dataclass

from studio.errors import StudioError


@dataclass(frozen=True)
class ChatSettings:
    """How an answer is generated. temperature 0 is greedy decoding (top_p and top_k then do nothing)."""

    system_prompt: str = ""
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 50
    max_new_tokens: int = 256
    repetition_penalty: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        checks = [("temperature", self.temperature >= 0, "0 (greedy) or more"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"), ("top_k", self.top_k >= 0, "0 (off) or more"),
                  ("max_new_tokens", self.max_new_tokens >= 1, "1 or more"),
                  ("repetition_penalty", self.repetition_penalty > 0, "above 0 (1 is off)")]
        for name, ok, allowed in checks:
            if not ok:
                raise StudioError(f"Chat setting {name} is {getattr(self, name)!r}; it must be {allowed}.")

    def describe(self) -> str:
        """The settings in a few words: "greedy, at most 32 new tokens"."""
        drawing = "greedy" if self.temperature == 0 else \
            f"sampling at temperature {self.temperature:g}, top-p {self.top_p:g}, top-k {self.top_k}"
        penalty = f", repetition penalty {self.repetition_penalty:g}" if self.repetition_penalty != 1 else ""
        return f"{drawing}{penalty}, at most {self.max_new_tokens} new tokens"
