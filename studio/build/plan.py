"""From a config and the opened models to a merge plan: every output tensor, its shape, dtype and origin.

Planning reads only config.json files and checkpoint headers, so it is instant, writes nothing, and finds
every incompatibility before a byte of output exists.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from studio.build.forward import why_not_streamable
from studio.build.outputs import MergeInputs, OutputArch, choose_output
from studio.config import DTYPES as DTYPE_NAMES, Expert, experts_with_gates, MoEConfig
from studio.errors import StudioError
from studio.families import Family, family_of, layer_of, shape_facts
from studio.gate_modes import gate_mode
from studio.sources import ModelSource, TensorInfo, tensor_nbytes

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the names config.py accepts
# 4-bit NF4 stores half a byte per weight plus one float32 absmax per 64 weights.
NF4_BYTES_PER_PARAM = 0.5 + 4 / 64


@dataclass(frozen=True)
class ModelRow:
    """One line of the compatibility table."""

    role: str
    ref: str
    family: str | None
    facts: dict[str, int | None]
    parameters: int
    dtype: str
    size_bytes: int
    local: bool


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: copied from a source tensor (maybe rescaled or noised), gate rows, or a constant.

    Gate rows are rows `router_row` onwards of layer `router_layer` of the computed gates; a job with neither a
    source nor a router layer holds `fill` everywhere (zeros, unless it is an idle gate).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    source: ModelSource | None = None
    source_name: str | None = None
    router_layer: int | None = None
    router_row: int = 0
    noise_scale: float | None = None
    scale: float | None = None
    fill: float = 0.0

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.dtype, self.shape)

    @property
    def is_plain_copy(self) -> bool:
        """True when the output bytes are exactly the source bytes (no cast, noise or scale)."""
        if self.source is None or self.noise_scale is not None or self.scale is not None:
            return False
        info = self.source.info(self.source_name)
        return info.offset is not None and info.dtype == self.dtype


@dataclass
class MergePlan:
    config: MoEConfig
    output: OutputArch
    family: Family
    base: ModelSource
    rows: list[ModelRow]
    jobs: list[TensorJob]
    moe_config: dict
    dtype_name: str | None
    sources: dict[str, ModelSource]  # every model read, by its reference in the config

    @property
    def total_bytes(self) -> int:
        return sum(job.nbytes for job in self.jobs)

    @property
    def parameters(self) -> int:
        return sum(job.nbytes // job.dtype.itemsize for job in self.jobs)

    def shards(self, max_bytes: int) -> list[list[TensorJob]]:
        """Consecutive jobs grouped into shards of at most `max_bytes` (a bigger tensor gets a shard alone)."""
        shards: list[list[TensorJob]] = [[]]
        size = 0
        for job in self.jobs:
            if shards[-1] and size + job.nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append(job)
            size += job.nbytes
        return shards

    def memory_estimates(self) -> dict[str, int]:
        """Bytes: the output on disk, the merged model in memory at bf16 and at 4-bit, and the merge's peak.

        The merge streams tensor by tensor; the hidden-gate pass holds one float32 layer of the base when the
        base can be streamed, else the whole base in bf16; `expert_text` first holds the base and one expert whole
        while the expert writes its text (bf16).
        """
        layer_matrices = sum(j.nbytes // j.dtype.itemsize for j in self.jobs
                             if len(j.shape) == 2 and layer_of(j.name) is not None)
        base_layers = Counter()  # parameters per decoder layer (the embedding is read row by row)
        for info in self.base.tensors.values():
            if layer_of(info.name) is not None:
                base_layers[layer_of(info.name)] += info.nbytes // info.dtype.itemsize
        hidden_pass = 0
        mode = gate_mode(self.config.gate_mode)
        whole_base = sum(i.nbytes // i.dtype.itemsize for i in self.base.tensors.values()) * 2
        if mode.runs in ("base", "merged"):
            streamed = why_not_streamable(self.base.config, 0) is None
            hidden_pass = max(base_layers.values(), default=0) * 4 if streamed else whole_base
        hidden_pass = max(hidden_pass, mode.whole_models * whole_base)
        return {
            "output": self.total_bytes,
            "bf16": self.parameters * 2,
            "4bit": int(layer_matrices * NF4_BYTES_PER_PARAM + (self.parameters - layer_matrices) * 2),
            "merge_peak": hidden_pass + max(j.nbytes for j in self.jobs) * 2,
        }


def _row(role: str, source: ModelSource) -> ModelRow:
    counts = Counter()
    params = 0
    for info in source.tensors.values():
        n = info.nbytes // info.dtype.itemsize
        params += n
        counts[str(info.dtype).removeprefix("torch.")] += n
    family = family_of(source.config.get("model_type"))
    return ModelRow(role, source.label, source.config.get("model_type") if family is None else family.name,
                    shape_facts(source.config), params, counts.most_common(1)[0][0] if counts else "?",
                    sum(i.nbytes for i in source.tensors.values()), source.ref.is_local)


def compatibility(config: MoEConfig, sources: dict[str, ModelSource]) -> tuple[list[ModelRow], list[str]]:
    """The table of models, and every way an expert does not fit the base (naming model, field, both values)."""
    base = sources[config.base_model]
    rows = [_row("base", base)]
    rows += [_row(f"experts[{i}]", sources[e.source_model]) for i, e in enumerate(config.experts)]
    rows += [_row(f"shared_experts[{i}]", sources[e.source_model]) for i, e in enumerate(config.shared_experts or [])]
    errors = []
    if family_of(base.config.get("model_type")) is None:
        errors.append(f"base_model ({base.label}): model_type {base.config.get('model_type')!r} is not supported; "
                      f"the studio reads llama, mistral, qwen2, qwen3 and phi models.")
    for row in rows[1:]:
        if row.family != rows[0].family:
            errors.append(f"{row.role} ({row.ref}): model family is {row.family}, but the base ({rows[0].ref}) is "
                          f"{rows[0].family}. Experts must be fine-tunes of the base's architecture.")
            continue
        for key, value in row.facts.items():
            if value != rows[0].facts[key]:
                errors.append(f"{row.role} ({row.ref}): {key} is {value}, but the base ({rows[0].ref}) has "
                              f"{rows[0].facts[key]}. Experts must share the base's shape.")
    return rows, errors


def output_dtype(config: MoEConfig, base: ModelSource) -> str | None:
    """The config's dtype, else the base's declared one, else None (keep each tensor's own)."""
    declared = config.dtype or base.config.get("torch_dtype") or base.config.get("dtype")
    return declared if declared in DTYPES else None


def make_plan(config: MoEConfig, sources: dict[str, ModelSource]) -> MergePlan:
    """Check the models against each other and list every output tensor. Raises StudioError on any misfit."""
    rows, errors = compatibility(config, sources)
    if errors:
        raise StudioError("The models do not fit together:\n" + "\n".join(f"  - {e}" for e in errors))
    base = sources[config.base_model]
    family = family_of(base.config["model_type"])
    inputs = MergeInputs(config, {r.ref: r.family for r in rows}, base.config)
    output = choose_output(inputs)
    dtype_name = output_dtype(config, base)
    jobs = _jobs(config, sources, base, family, output, dtype_name)
    moe_config = output.moe_config(base.config, config, dtype_name)
    return MergePlan(config, output, family, base, rows, jobs, moe_config, dtype_name, sources)


def _jobs(config: MoEConfig, sources: dict[str, ModelSource], base: ModelSource, family: Family,
          output: OutputArch, dtype_name: str | None) -> list[TensorJob]:
    out_dtype = DTYPES.get(dtype_name) if dtype_name else None
    tied = bool(base.config.get("tie_word_embeddings", False))

    def copy(name: str, info: TensorInfo, source: ModelSource, **extra) -> TensorJob:
        return TensorJob(name, info.shape, out_dtype or info.dtype, source, info.name, **extra)

    layers: dict[int | None, list[TensorJob]] = {}
    for name, info in base.tensors.items():
        if family.is_mlp(name) or (tied and name == family.lm_head):
            continue
        layers.setdefault(layer_of(name), []).append(copy(name, info, base))
    if tied and output.explicit_lm_head:  # the output unties the head: a copy of the embedding
        layers.setdefault(None, []).append(copy(output.explicit_lm_head, base.info(family.embed), base))
    zeros_dtype = out_dtype or base.info(family.embed).dtype
    for name, shape in output.zero_tensors(base.config, config, set(base.tensors)).items():
        layers.setdefault(layer_of(name), []).append(TensorJob(name, shape, zeros_dtype))
    n_layers = base.config["num_hidden_layers"]
    hidden = base.config["hidden_size"]
    # Routers go last: the merge writes every other tensor while the gates are still being computed.
    routers = [TensorJob(output.router(layer), (len(config.experts), hidden), out_dtype or torch.float32,
                         router_layer=layer) for layer in range(n_layers)]
    shared_gated = len(experts_with_gates(config)) > len(config.experts)
    for layer in range(n_layers):
        block = layers.setdefault(layer, [])
        dense = family.mlp_tensors(layer)
        for label, expert, names, scale in _experts_of_layer(config, output, layer, shared_gated):
            source = sources[expert.source_model]
            for role, out_name in names.items():
                info = _expert_tensor(source, dense[role], base.info(dense[role]), config, label)
                block.append(copy(out_name, info, source, noise_scale=expert.noise_scale,
                                  scale=scale if role in family.output_roles and scale != 1.0 else None))
        gate = output.shared_gate(layer)
        if gate and shared_gated:
            routers.append(TensorJob(gate, (1, hidden), out_dtype or torch.float32, router_layer=layer,
                                     router_row=len(config.experts)))
        elif gate:  # an ungated shared expert, or the output's stand-in for none
            block.append(TensorJob(gate, (1, hidden), zeros_dtype, fill=output.idle_gate_fill(zeros_dtype)))
    non_layer = layers.pop(None, [])
    head = [j for j in non_layer if "embed" in j.name]
    tail = [j for j in non_layer if "embed" not in j.name]
    jobs = head + [job for layer in sorted(layers) for job in layers[layer]] + tail + routers
    # Empty tensors last: safetensors rejects a file where one shares its offset with a tensor after it.
    return [j for j in jobs if j.nbytes] + [j for j in jobs if not j.nbytes]


def _experts_of_layer(config: MoEConfig, output: OutputArch, layer: int,
                      shared_gated: bool) -> list[tuple[str, Expert, dict[str, str], float | None]]:
    """Each expert whose MLP goes into `layer`: its label, the expert, MLP role -> output name, and the factor for
    its output projection (residual_scale; for an ungated shared expert, times the output's make-up for that)."""
    members = [(f"experts[{j}]", e, output.expert(layer, j), e.residual_scale) for j, e in enumerate(config.experts)]
    for shared in config.shared_experts or []:
        compensation = 1.0 if shared_gated else output.ungated_shared_scale
        members.append(("shared_experts[0]", shared, output.shared_expert(layer),
                        (shared.residual_scale or 1.0) * compensation))
    return members


def _expert_tensor(source: ModelSource, name: str, base_info: TensorInfo, config: MoEConfig,
                   label: str) -> TensorInfo:
    info = source.info(name)
    if info.shape != base_info.shape:
        raise StudioError(f"{label} ({source.label}): tensor {name} has shape {list(info.shape)}, but the "
                          f"base ({config.base_model}) has {list(base_info.shape)}. Experts must share the base's "
                          f"shape.")
    return info
