"""Output architectures: one small class per MoE family the studio can write.

Each says which inputs it accepts (and why not), what its config.json looks like, and what its
tensors are called. The merge engine knows nothing else about them.
"""

from __future__ import annotations

from dataclasses import dataclass

from studio.config import MoEConfig
from studio.errors import StudioError


@dataclass(frozen=True)
class MergeInputs:
    """What an output needs to know about the models being merged."""

    config: MoEConfig
    model_types: dict[str, str | None]  # reference -> model_type, base first
    base_config: dict


class OutputArch:
    """One MoE output family."""

    name: str = ""
    input_model_types: tuple[str, ...] = ()
    max_shared_experts: int = 0

    def why_not(self, inputs: MergeInputs) -> str | None:
        """Why these inputs cannot become this output, or None if they can."""
        others = sorted({str(t) for t in inputs.model_types.values() if t not in self.input_model_types})
        if others:
            return f"needs {' or '.join(self.input_model_types)} models, got {', '.join(others)}"
        if len(set(inputs.model_types.values())) > 1:
            return "needs every model to be of one family"
        shared = len(inputs.config.shared_experts or [])
        if shared > self.max_shared_experts:
            return f"supports at most {self.max_shared_experts} shared experts, the config has {shared}"
        return None

    def moe_config(self, base_config: dict, config: MoEConfig, dtype: str | None) -> dict:
        raise NotImplementedError

    def router(self, layer: int) -> str:
        raise NotImplementedError

    def expert(self, layer: int, expert: int) -> dict[str, str]:
        """MLP role -> output tensor name for routed expert `expert` of `layer`."""
        raise NotImplementedError


def _outputs() -> list[OutputArch]:
    from studio.outputs.mixtral import Mixtral

    return [Mixtral()]


def choose_output(inputs: MergeInputs) -> OutputArch:
    """The output the config asks for (by case-insensitive name prefix, as mergekit), or the first that fits."""
    wanted = (inputs.config.architecture or "").lower()
    named = [o for o in _outputs() if o.name.lower().startswith(wanted)]
    if not named:
        names = ", ".join(o.name for o in _outputs())
        raise StudioError(f"`architecture: {inputs.config.architecture}` matches no output; choose one of {names}.")
    reasons = {o.name: o.why_not(inputs) for o in named}
    fitting = [o for o in named if reasons[o.name] is None]
    if fitting:
        return fitting[0]
    lines = "\n".join(f"  - {name}: {why}" for name, why in reasons.items())
    raise StudioError(f"No output architecture fits these models:\n{lines}")


def output_names() -> list[str]:
    """The names of the output architectures, as the config's `architecture` field takes them."""
    return [o.name for o in _outputs()]
