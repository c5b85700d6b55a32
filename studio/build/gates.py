"""Router (gate) rows built from prompts, embeddings or noise: mergekit-moe's gate modes.

The result is one tensor G of shape (layers, experts, hidden): G[l, e] becomes row e of layer l's router.

hidden      the base model's residual stream entering layer l, at each prompt's last token; mean over the
            positive prompts minus mean over the negative ones, scaled to unit norm.
hidden_avg  the same, averaged over the prompt's real tokens instead of taken at the last one.
cheap_embed the normalised sum of the prompts' token embeddings, the same row for every layer.
random      standard normal entries (for sparse upcycling that will be trained).
uniform_random  U(-1/sqrt(H), 1/sqrt(H)), PyTorch's nn.Linear initialisation.
calibrated  the studio's own: routers fitted where the merged model's routers look (studio/build/calibrate.py).
expert_text the studio's own: the same fit, on text the experts write from their prompts (studio/build/expert_text.py);
            once written, the merge refines these routers end to end (studio/build/refine.py).

Which modes exist, and what each needs, is data in studio/gate_modes.py; COMPUTE below maps each to its function.

Prompts are the BOS string followed by the raw prompt text, as in mergekit (or, with `prompt_format: chat`,
a user turn of the base's chat template; studio/prompts.py). The base's hidden states at the prompts come from
studio/build/hidden_states.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from studio.build import expert_text
from studio.build.calibrate import CONFIDENCE, calibrated_gates, fit_router, prompt_targets, ridge_router
from studio.build.forward import StreamedMoE, why_not_streamable
from studio.build.hidden_states import hidden_states_of_prompts, pad_id, padded_batches
from studio.build.plan import MergePlan
from studio.build.refine import Lesson, position_weights
from studio.config import Expert, experts_with_gates
from studio.devices import resolve_device
from studio.errors import StudioError
from studio.families import Family
from studio.gate_modes import MODES
from studio.prompts import load_tokenizer, prompt_encoder, prompt_ids
from studio.sources import ModelSource

DEGENERATE_CONDITION = 5.0


@dataclass
class GateOptions:
    device: str = "cpu"  # cpu, cuda, or auto (accelerate's device map over every GPU, then CPU)
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    batch_size: int = 16
    seed: int | None = None
    trust_remote_code: bool = False


GateFunction = Callable[["GateJob"], torch.Tensor]
# progress(phase, done, total, label): "hidden" (the base's hidden states), "text" (experts writing calibration
# text, then reading each other's) or "fit" (routers fitted layer by layer); the label says it in words.
GateProgress = Callable[[str, int, int, str], None]


@dataclass
class GateJob:
    """What a gate mode's function gets: the plan, the options, and where to log, report progress and check for a
    stop."""

    plan: MergePlan
    options: GateOptions
    log: Callable[[str], None]
    check: Callable[[], None]
    progress: GateProgress = lambda phase, done, total, label: None
    # Modes that read expert text also keep what each expert predicts on it (studio/build/refine.py).
    teach: bool = False
    lessons: list[Lesson] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        config = self.plan.base.config
        return config["num_hidden_layers"], len(experts_with_gates(self.plan.config)), config["hidden_size"]

    def tokenizer(self):
        return load_tokenizer(self.plan.base, self.options.trust_remote_code)

    def encoder(self, tokenizer) -> Callable[[str], list[int]]:
        return prompt_encoder(tokenizer, self.plan.config.prompt_format, self.plan.base.label)


def compute_gates(plan: MergePlan, options: GateOptions, log: Callable[[str], None] = print,
                  check: Callable[[], None] = lambda: None,
                  progress: GateProgress = lambda phase, done, total, label: None) -> torch.Tensor:
    """G (layers, experts, hidden) in float32, for `experts_with_gates(config)` in that order.

    `check` is called between layers or batches of the work; it raises to stop it. `progress` hears of each
    layer, batch or expert done.
    """
    return compute_routers(plan, options, log, check, progress)[0]


def compute_routers(plan: MergePlan, options: GateOptions, log: Callable[[str], None] = print,
                    check: Callable[[], None] = lambda: None,
                    progress: GateProgress = lambda phase, done, total, label: None,
                    teach: bool = False) -> tuple[torch.Tensor, list[Lesson]]:
    """`compute_gates`, and, with `teach` and a mode that reads expert text, the lessons that refine the routers
    once the merged model is written (else an empty list)."""
    job = GateJob(plan, options, log, check, progress, teach=teach)
    return COMPUTE[plan.config.gate_mode](job), job.lessons


def _random(job: GateJob) -> torch.Tensor:
    return random_gates(job.plan.config.gate_mode, job.shape, job.options.seed)


def _cheap_embed(job: GateJob) -> torch.Tensor:
    encode = job.encoder(job.tokenizer())
    plan = job.plan
    experts = experts_with_gates(plan.config)
    rows = torch.stack([embedding_direction(e, encode, plan.base, plan.family) for e in experts])
    return rows.unsqueeze(0).expand(job.shape[0], -1, -1).contiguous()


def _hidden(job: GateJob) -> torch.Tensor:
    plan, tokenizer = job.plan, job.tokenizer()
    experts = experts_with_gates(plan.config)
    states = hidden_states_of_prompts(plan.base, plan.family, tokenizer, _all_prompts(experts), job.options,
                                      average=(plan.config.gate_mode == "hidden_avg"), log=job.log,
                                      check=job.check, encode=job.encoder(tokenizer), progress=job.progress)
    rows = [_mean(states, e.positive_prompts) - _mean(states, e.negative_prompts) for e in experts]
    return unit_rows(torch.stack(rows, dim=1))


def _calibrated(job: GateJob) -> torch.Tensor:
    tokenizer = job.tokenizer()
    encode = job.encoder(tokenizer)
    experts = job.plan.config.experts
    encoded = {p: encode(p) for p in _all_prompts(experts)}
    moe = _merged_model(job, max(map(len, encoded.values())))
    job.log(f"Fitting calibrated routers on every token of {len(encoded)} prompts, layer by layer through the "
            f"merged model")
    return _fit_through(moe, job, tokenizer, encoded, prompt_targets(experts))


def _expert_text(job: GateJob, fit: Callable[..., torch.Tensor] = fit_router,
                 confidence: float | None = None) -> torch.Tensor:
    tokenizer, plan, options = job.tokenizer(), job.plan, job.options
    encode = job.encoder(tokenizer)
    experts = plan.config.experts
    prompts = {p: encode(p) for p in _all_prompts(experts)}
    plain = {p: prompt_ids(tokenizer, p) for p in prompts}  # what the experts continue (expert_text.py says why)
    longest = max(map(len, [*prompts.values(), *plain.values()])) + max(expert_text.NEW_TOKENS,
                                                                        expert_text.WINDOW + 1)
    moe = _merged_model(job, longest)  # before any text is written: a base it cannot run is named at once
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    start = bos or [t for t in (tokenizer.eos_token_id,) if t is not None]  # where a document starts
    texts, taught = expert_text.expert_texts(
        experts, [plan.sources[e.source_model] for e in experts], plan.base, plain.__getitem__,
        lambda text: tokenizer(text, add_special_tokens=False)["input_ids"], bos, start, resolve_device(options.device),
        options.seed, options.trust_remote_code, job.log, job.check, partial(job.progress, "text"))
    lessons = list(taught.values())
    job.lessons = lessons if job.teach else []
    encoded = {**prompts, **texts}
    targets = {**prompt_targets(experts), **expert_text.text_targets(texts, len(experts))}
    job.log(f"Fitting routers on {sum(map(len, encoded.values()))} tokens of the experts' text and prompts, layer "
            f"by layer through the merged model, each token of the text weighed by what its expert gains there")
    weights = dict(zip(taught, position_weights(lessons)))
    return _fit_through(moe, job, tokenizer, encoded, targets, confidence=confidence, l2=expert_text.L2, fit=fit,
                        weights=weights)


def _expert_text_ridge(job: GateJob) -> torch.Tensor:
    # The ridge's raw outputs are nearly flat under a softmax: scaled like `calibrated`'s routers instead.
    return _expert_text(job, ridge_router, CONFIDENCE)


def _merged_model(job: GateJob, longest: int) -> StreamedMoE:
    """The merged model for the fit, with sequences up to `longest` tokens; refused when it cannot be run."""
    if job.options.load_in_4bit or job.options.load_in_8bit:
        raise StudioError(f"`gate_mode: {job.plan.config.gate_mode}` runs the merged model from its checkpoints in "
                          f"full precision; drop --load-in-4bit / --load-in-8bit (the pass holds one layer at a "
                          f"time anyway).")
    return streamed_moe(job.plan, job.options.device, longest)


def _fit_through(moe: StreamedMoE, job: GateJob, tokenizer, encoded: dict, targets: dict, **fit) -> torch.Tensor:
    """Routers fitted layer by layer through `moe` on the tokens of `encoded`, each sequence wanting its target."""
    batches = list(padded_batches(encoded, job.options.batch_size, pad_id(tokenizer)))
    ignored = [t for t in (tokenizer.bos_token_id,) if t is not None]
    layers = job.shape[0]

    def fitted(layer: int) -> None:
        job.progress("fit", layer + 1, layers, f"Fitting routers: layer {layer + 1} of {layers}")

    return calibrated_gates(moe, batches, targets, ignored, job.log, job.check, on_layer=fitted, **fit)


COMPUTE: dict[str, GateFunction] = {"hidden": _hidden, "hidden_avg": _hidden, "cheap_embed": _cheap_embed,
                                    "random": _random, "uniform_random": _random, "calibrated": _calibrated,
                                    "expert_text": _expert_text, "expert_text_ridge": _expert_text_ridge}
assert set(COMPUTE) == set(MODES), "every gate mode in studio/gate_modes.py needs its function here"


def streamed_moe(plan: MergePlan, device: str = "cpu", longest_prompt: int = 0) -> StreamedMoE:
    """The merged model of `plan`, run from its source checkpoints one layer at a time."""
    reason = why_not_streamable(plan.base.config, longest_prompt)
    if reason:
        raise StudioError(f"Calibrated gates and the routing preview run the merged model from its checkpoints, "
                          f"which works for llama, mistral, qwen2 and qwen3 bases; here {reason}. Use "
                          f"`gate_mode: hidden`, and look at the routing after the merge.")
    device = resolve_device(device)
    config = plan.config
    shared = (config.shared_experts or [None])[0]
    return StreamedMoE(base=plan.base, family=plan.family,
                       experts=[plan.sources[e.source_model] for e in config.experts],
                       scales=[e.residual_scale for e in config.experts], top_k=config.experts_per_token,
                       renormalize=bool(plan.moe_config.get("norm_topk_prob", True)), device=device,
                       shared=plan.sources[shared.source_model] if shared else None,
                       shared_scale=(shared.residual_scale or 1.0) if shared else 1.0)


def random_gates(mode: str, shape: tuple[int, int, int], seed: int | None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    if mode == "random":
        return torch.randn(shape, generator=generator)
    bound = shape[-1] ** -0.5
    return (torch.rand(shape, generator=generator) * 2 - 1) * bound


def unit_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)


def embedding_direction(expert: Expert, encode: Callable[[str], list[int]], base: ModelSource,
                        family: Family) -> torch.Tensor:
    """cheap_embed: unit(sum of positive prompt embeddings) - unit(sum of negative ones), unit norm.

    Only the prompt tokens' rows of the embedding are read from disk.
    """

    def direction(prompts: list[str] | None) -> torch.Tensor:
        ids = [i for prompt in prompts or [] for i in encode(prompt)]
        if not ids:
            return torch.zeros(base.config["hidden_size"])
        return unit_rows(base.read_rows(family.embed, ids).float().sum(dim=0))

    row = direction(expert.positive_prompts)
    if expert.negative_prompts:
        row = row - direction(expert.negative_prompts)
    return unit_rows(row)


def _all_prompts(experts: list[Expert]) -> list[str]:
    prompts = [p for e in experts for p in (e.positive_prompts or []) + (e.negative_prompts or [])]
    return list(dict.fromkeys(prompts))


def _mean(states: dict[str, torch.Tensor], prompts: list[str] | None) -> torch.Tensor | float:
    return torch.stack([states[p] for p in prompts]).mean(dim=0) if prompts else 0.0


def degenerate_gate_warning(gates: torch.Tensor, labels: list[str]) -> str | None:
    """Name the layers whose router rows are nearly dependent, and the pair of experts to blame.

    A layer is flagged, as in mergekit, when the condition number of its (experts x hidden) matrix exceeds 5.
    """
    if gates.shape[1] < 2:
        return None
    condition = torch.linalg.cond(gates.float())
    flagged = [l for l in range(gates.shape[0]) if not condition[l] <= DEGENERATE_CONDITION]
    if not flagged:
        return None
    by_pair: dict[tuple[int, int], list[int]] = {}
    worst_cosine: dict[tuple[int, int], float] = {}
    for layer in flagged:
        rows = unit_rows(gates[layer].float())
        cosine = rows @ rows.T
        cosine.fill_diagonal_(-2.0)
        i, j = divmod(int(cosine.argmax()), cosine.shape[1])
        pair = (min(i, j), max(i, j))
        by_pair.setdefault(pair, []).append(layer)
        worst_cosine[pair] = max(worst_cosine.get(pair, -1.0), float(cosine[i, j]))
    details = "; ".join(
        f"layers {_ranges(layers)}: experts {a} ({labels[a]}) and {b} ({labels[b]}) are most alike "
        f"(cosine {worst_cosine[(a, b)]:.2f})" for (a, b), layers in sorted(by_pair.items()))
    return (f"Degenerate routing in {len(flagged)} of {gates.shape[0]} layers (router condition number up to "
            f"{float(condition[flagged].max()):.1f} > {DEGENERATE_CONDITION:g}): {details}. Some experts will be "
            f"underused; give those experts more distinct prompts.")


def _ranges(numbers: list[int]) -> str:
    spans, start = [], numbers[0]
    for prev, cur in zip(numbers, numbers[1:] + [None]):
        if cur != prev + 1:
            spans.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(spans)
