"""The gate modes as data: what each one needs and what it runs, like the output architectures.

The functions that compute each mode's router rows live in studio/build/gates.py, keyed by these names; this module
stays free of torch so that the config can check a mode without importing the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class GateMode:
    name: str
    needs_prompts: bool  # builds its rows from positive_prompts (and negative ones)
    runs: Literal["nothing", "embeddings", "base", "merged"]  # what it reads or runs to compute the rows
    # Rows are averages of prompt vectors (not fitted), so nearly parallel rows mean degenerate routing.
    averaged_rows: bool = False
    studio_only: bool = False  # mergekit-moe does not know it
    whole_models: int = 0  # full models it holds in memory at once (expert_text: the base and the writing expert)
    reads_expert_text: bool = False  # fits on text the experts write (or their `calibration_text` files)
    refines: bool = False  # its routers are trained end to end once the model is written (studio/build/refine.py)
    # The progress bar's share of each phase of its pass (studio/app/progress.py), measured on the zoo: a hidden-state
    # pass of the prompts is most of a small model's merge; expert_text's writing of text half of its merge, and the
    # refinement of the written routers a third.
    phases: tuple[tuple[str, float], ...] = ()
    summary: str = ""


MODES = {mode.name: mode for mode in (
    GateMode("hidden", True, "base", averaged_rows=True, phases=(("hidden", 0.6),),
             summary="the base's residual stream entering each layer at each prompt's last token"),
    GateMode("hidden_avg", True, "base", averaged_rows=True, phases=(("hidden", 0.6),),
             summary="the same, averaged over each prompt's tokens"),
    GateMode("cheap_embed", True, "embeddings", averaged_rows=True,
             summary="the prompts' token embeddings, the same row in every layer"),
    GateMode("random", False, "nothing", summary="standard normal (for sparse upcycling that will be trained)"),
    GateMode("uniform_random", False, "nothing", summary="nn.Linear's initialisation"),
    GateMode("calibrated", True, "merged", studio_only=True, phases=(("fit", 0.6),),
             summary="fitted on every token of the prompts, where the merged model's routers look"),
    GateMode("expert_text", True, "merged", studio_only=True, whole_models=2, reads_expert_text=True,
             refines=True, phases=(("text", 0.5), ("fit", 0.1), ("refine", 0.3)),
             summary="fitted on text each expert writes from its prompts (or text you give), where the merged "
                     "model's routers look"),
    GateMode("expert_text_ridge", True, "merged", studio_only=True, whole_models=2, reads_expert_text=True,
             phases=(("text", 0.75), ("fit", 0.15)),
             summary="the same text, routers by DUME's closed-form ridge regression (a baseline for expert_text)"),
)}
ALIASES = {"hidden_last": "hidden"}


def gate_mode(name: str) -> GateMode:
    return MODES[ALIASES.get(name, name)]
