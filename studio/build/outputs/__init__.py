"""Output architectures: one small class per MoE family the studio can write.

Each says which inputs it accepts (and why not), what its config.json looks like, what its tensors are
called, which tensors it adds that no input has (zeros), and which files beside the weights it needs
(modeling code, for outputs transformers does not ship). The merge engine knows nothing else about them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from studio.config import MoEConfig
from studio.errors import StudioError
from studio.families import kv_heads

DROPPED_KEYS = ("architectures", "model_type", "auto_map", "transformers_version", "_name_or_path")
MODELING = Path(__file__).parent / "modeling"


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
    # Multiplies an ungated shared expert's output projection: an output whose shared expert always has a gate
    # gives an unprompted one a zero gate row, and makes up for that gate's constant value here.
    ungated_shared_scale: float = 1.0
    # Modeling code (in studio/build/outputs/modeling) copied next to the weights; loading then needs trust_remote_code.
    code_files: tuple[str, ...] = ()
    # The name of an output head written even when the base ties it to the embedding (a copy of the embedding),
    # for outputs whose llama.cpp graph has no tied head; empty when a tied base stays tied.
    explicit_lm_head: str = ""

    def why_not(self, inputs: MergeInputs) -> str | None:
        """Why these inputs cannot become this output, or None if they can."""
        others = sorted({str(t) for t in inputs.model_types.values() if t not in self.input_model_types})
        if others:
            *first, last = self.input_model_types
            wanted = f"{', '.join(first)} or {last}" if first else last
            return f"needs {wanted} models, got {', '.join(others)}"
        if len(set(inputs.model_types.values())) > 1:
            return "needs every model to be of one family"
        shared = len(inputs.config.shared_experts or [])
        if shared > self.max_shared_experts:
            limit = f"at most {self.max_shared_experts}" if self.max_shared_experts else "no"
            return f"has {limit} shared expert, and the config has {shared}"
        return None

    def moe_config(self, base_config: dict, config: MoEConfig, dtype: str | None) -> dict:
        raise NotImplementedError

    def router(self, layer: int) -> str:
        raise NotImplementedError

    def expert(self, layer: int, expert: int) -> dict[str, str]:
        """MLP role -> output tensor name for routed expert `expert` of `layer`."""
        raise NotImplementedError

    def shared_expert(self, layer: int) -> dict[str, str]:
        """MLP role -> output tensor name for the shared expert of `layer` (outputs that have one)."""
        raise NotImplementedError

    def shared_gate(self, layer: int) -> str | None:
        """The (1, hidden) gate of the shared expert of `layer`, for outputs whose shared expert is gated."""
        return None

    def idle_gate_fill(self, dtype: torch.dtype) -> float:
        """The value of every element of a shared-expert gate that no prompt made (outputs with `shared_gate`)."""
        return 0.0

    def zero_tensors(self, base_config: dict, config: MoEConfig, base_names: set[str]) -> dict[str, tuple[int, ...]]:
        """Tensors of this output that no input has, written as zeros: name -> shape."""
        return {}

    def files(self) -> list[Path]:
        return [MODELING / name for name in self.code_files]


class ExpertList(OutputArch):
    """Names of outputs that keep each expert's projections as they are in a dense model, under
    `mlp.experts.J`, and the router at `mlp.gate` (Qwen-MoE, DeepSeek-MoE)."""

    def router(self, layer: int) -> str:
        return f"model.layers.{layer}.mlp.gate.weight"

    def expert(self, layer: int, expert: int) -> dict[str, str]:
        return swiglu_names(f"model.layers.{layer}.mlp.experts.{expert}")


def swiglu_names(prefix: str) -> dict[str, str]:
    """MLP role -> name of a Llama-style MLP's projections under `prefix`."""
    return {role: f"{prefix}.{role}_proj.weight" for role in ("gate", "up", "down")}


def base_fields(base_config: dict, dtype: str | None, dropped: tuple[str, ...] = ()) -> dict:
    """The base's config.json without what names its class, and with the output dtype."""
    out = {k: v for k, v in base_config.items() if k not in DROPPED_KEYS + dropped}
    out["num_key_value_heads"] = kv_heads(base_config)
    rope = out.get("rope_parameters") or {}
    if "rope_theta" not in out and "rope_theta" in rope:
        out["rope_theta"] = rope["rope_theta"]  # transformers 4.x reads only the top-level key
    if dtype:
        out["torch_dtype"] = out["dtype"] = dtype
    return out


def _outputs() -> list[OutputArch]:
    from studio.build.outputs.deepseek import DeepseekMoE
    from studio.build.outputs.mixtral import Mixtral
    from studio.build.outputs.phi_moe import PhiMoE
    from studio.build.outputs.qwen2_moe import Qwen2MoE
    from studio.build.outputs.qwen3_moe import Qwen3MoE

    # mergekit's order (Mixtral wins whenever it fits), then the outputs mergekit lacks.
    return [Mixtral(), DeepseekMoE(), Qwen2MoE(), Qwen3MoE(), PhiMoE()]


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
