"""The merge: config -> plan -> gates -> tensors on disk (-> routers refined), streamed, atomic and cancellable.

The output is built in a hidden sibling folder and renamed into place only when every file is written, so
an interrupted merge (error, cancel, Ctrl-C) leaves nothing that looks like a model.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from studio.build import card, destination, integrity
from studio.build.gates import GateOptions, compute_routers, degenerate_gate_warning
from studio.build.plan import MergePlan, TensorJob, make_plan
from studio.build.refine import Lesson, refine_written, why_not_refined
from studio.build.writer import shard_names, write_shard
from studio.config import MoEConfig, check_rules, dump_yaml, experts_with_gates
from studio.devices import check_device, resolve_device
from studio.errors import Cancelled, StudioError
from studio.formatting import human_bytes
from studio.gate_modes import gate_mode
from studio.sources import TOKENIZER_FILES, ModelSource, open_models, progress_tqdm, read_json
from studio.tokenizer_files import write_portable_tokenizer_config

class CancelToken:
    """Set from any thread (a UI button, a signal handler); the merge stops at the next tensor."""

    def __init__(self, event: threading.Event | None = None) -> None:
        self._event = event or threading.Event()  # the CLI passes the event its signal handler sets

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled("Merge cancelled; nothing was written.")


# A merge's stages: waiting for the one before it, opening the models, downloading, the router pass's phases
# (a hidden-state pass, experts writing text, fitting routers), writing the weights, refining the written routers,
# done.
Stage = Literal["queued", "open", "download", "hidden", "text", "fit", "write", "refine", "done"]


@dataclass
class Progress:
    stage: Stage
    done: int
    total: int
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.done / self.total if self.total else 1.0


@dataclass
class MergeOptions:
    out_shard_size: int = 5_000_000_000
    device: str = "cpu"
    load_in_4bit: bool = False
    load_in_8bit: bool = False
    random_seed: int | None = None
    trust_remote_code: bool = False
    allow_identical_experts: bool = False
    copy_tokenizer: bool = True
    overwrite: bool = False
    batch_size: int = 16
    refine_routers: bool = True  # for the gate modes that refine (studio/build/refine.py), when the model fits

    def gate_options(self) -> GateOptions:
        return GateOptions(device=self.device, load_in_4bit=self.load_in_4bit, load_in_8bit=self.load_in_8bit,
                           batch_size=self.batch_size, seed=self.random_seed, trust_remote_code=self.trust_remote_code)


@dataclass
class MergeResult:
    out: Path
    plan: MergePlan
    files: list[str]
    warnings: list[str] = field(default_factory=list)


def prepare(config: MoEConfig, options: MergeOptions, log: Callable[[str], None] = print,
            progress: Callable[[Progress], None] | None = None) -> tuple[MergePlan, list[str]]:
    """Validate the config, open every model (reporting Hub downloads to `progress`) and plan the merge.
    Returns the plan and the warnings."""
    check_device(options.device)
    errors, warnings = check_rules(config, options.allow_identical_experts)
    if errors:
        raise StudioError("The config breaks these rules:\n" + "\n".join(f"  - {e}" for e in errors))

    def downloading(what: str, done: int, total: int) -> None:  # huggingface_hub's bars count bytes
        of = f" of {human_bytes(total)}" if total else ""
        progress(Progress("download", done, total, f"Downloading from the Hub ({what}): {human_bytes(done)}{of}"))

    downloads = progress_tqdm(downloading) if progress else None
    sources = open_models(config.model_refs(), on_open=lambda ref: log(f"Opening {ref}"), tqdm_class=downloads)
    return make_plan(config, sources), warnings


def merge(config: MoEConfig, out: str | Path, options: MergeOptions | None = None,
          progress: Callable[[Progress], None] | None = None, cancel: CancelToken | None = None,
          log: Callable[[str], None] = print) -> MergeResult:
    """Merge `config` into the folder `out`. Raises StudioError (Cancelled when cancelled).

    Every path is resolved first; the output is locked for the whole merge (a second merge to it is refused);
    leftovers of killed merges in the same parent folder are removed."""
    options = options or MergeOptions()
    cancel = cancel or CancelToken()
    report = progress or (lambda p: None)
    out = destination.resolve_output(out)
    destination.check_destination(out, options.overwrite)
    # Local models are known before anything is opened: refuse an output inside one before its parent is made.
    local = [Path(ref).expanduser() for ref in config.model_refs() if Path(ref).expanduser().is_dir()]
    destination.check_not_a_source(out, local)
    with destination.OutputLock(out) as lock:
        report(Progress("open", 0, 1, "Opening models"))
        plan, warnings = prepare(config, options, log=log, progress=report)
        for warning in warnings:
            log(f"Warning: {warning}")
        # Again with every source opened: a Hub model's folder in the cache is known only now.
        destination.check_not_a_source(out, [s.folder for s in integrity.plan_sources(plan)])
        in_progress = destination.remove_stale(out.parent, lock, log)
        destination.check_disk_space(out, plan.total_bytes, in_progress)
        cancel.check()
        files, gates = _build(config, plan, out, options, report, cancel, log)
    for warning in _gate_warnings(config, gates):
        log(f"Warning: {warning}")
        warnings.append(warning)
    report(Progress("done", plan.total_bytes, plan.total_bytes, f"Merged into {out}"))
    log(f"Wrote {len(files)} files, {plan.total_bytes / 1e9:.2f} GB, to {out}")
    return MergeResult(out, plan, files, warnings)


def _build(config: MoEConfig, plan: MergePlan, out: Path, options: MergeOptions, report: Callable[[Progress], None],
           cancel: CancelToken, log: Callable[[str], None]) -> tuple[list[str], torch.Tensor]:
    """Write into a staging folder, check it, rename it into place; on any failure or signal remove it."""
    stamps = integrity.stamp_sources(plan)
    staging = destination.new_staging(out)
    stop = threading.Event()
    gates = _start_gates(config, plan, options, cancel, stop, log, report)
    try:
        files = _write_all(plan, gates, staging, options, report, cancel)
        routers = _gates_of(plan, gates)
        lessons = gates.result()[1]
        if lessons:
            routers = _refine(staging, plan, routers, lessons, options, report, cancel, log)
        integrity.check_sources_unchanged(stamps)
        cancel.check()  # a signal whose KeyboardInterrupt was swallowed somewhere still stops the merge here
        destination.move_into_place(staging, out, options.overwrite)
    except OSError as exc:
        stop.set()
        shutil.rmtree(staging, ignore_errors=True)
        integrity.check_sources_unchanged(stamps)  # a source deleted mid-merge is named as such, not as a write error
        named = destination.disk_full_error(exc, out, plan.total_bytes)
        if named:
            raise named from exc
        raise StudioError(f"Writing {out} failed: {exc.strerror or exc} ({exc.filename or staging}). Nothing was "
                          f"left at {out}.") from exc
    except BaseException:
        stop.set()
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return files, routers


def _start_gates(config: MoEConfig, plan: MergePlan, options: MergeOptions, cancel: CancelToken,
                 stop: threading.Event, log: Callable[[str], None], report: Callable[[Progress], None]) -> Future:
    """Compute the gates on a worker thread, so the expert weights stream to disk meanwhile."""

    def check() -> None:
        if stop.is_set():
            raise Cancelled("Gate computation stopped.")
        cancel.check()

    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gates")
    def progress(phase: str, done: int, total: int, label: str) -> None:
        report(Progress(phase, done, total, label))

    teach = _will_refine(plan, options, log)
    if not teach and "refine" in dict(gate_mode(config.gate_mode).phases):
        report(Progress("refine", 1, 1, "Router refinement skipped"))
    future = executor.submit(compute_routers, plan, options.gate_options(), log, check, progress, teach)
    executor.shutdown(wait=False)
    return future


def _will_refine(plan: MergePlan, options: MergeOptions, log: Callable[[str], None]) -> bool:
    """Whether the routers will be refined once written; says why not when the mode would."""
    if not gate_mode(plan.config.gate_mode).refines:
        return False
    if not options.refine_routers:
        log("Router refinement: off (--no-refine)")
        return False
    reason = why_not_refined(plan.parameters, resolve_device(options.device))
    if reason:
        log(f"Router refinement: skipped, because {reason}")
    return reason is None


def _refine(staging: Path, plan: MergePlan, routers: torch.Tensor, lessons: list[Lesson], options: MergeOptions,
            report: Callable[[Progress], None], cancel: CancelToken, log: Callable[[str], None]) -> torch.Tensor:
    """The routers after refinement (written over the staged ones), with any shared-expert gate rows kept."""

    def step(done: int, total: int) -> None:
        report(Progress("refine", done, total, f"Refining the routers end to end: step {done} of {total}"))

    report(Progress("refine", 0, 1, "Refining the routers: loading the merged model"))
    device = resolve_device(options.device)
    try:
        refined = refine_written(staging, plan, lessons, device, options.trust_remote_code, log, cancel.check, step,
                                 options.random_seed or 0)
    except torch.cuda.OutOfMemoryError:  # the estimate leaves headroom, but logits grow with the vocabulary
        log(f"Router refinement: stopped, because the GPU ran out of memory ({device}); the fitted routers are kept")
        refined = None
    report(Progress("refine", 1, 1, "Routers refined"))  # also when refinement stopped before its first step
    if refined is None or not refined.step:  # the fitted routers stay, exactly as written
        return routers
    routers = routers.clone()
    routers[:, :refined.rows.shape[1]] = refined.rows
    integrity.check_routers(routers, plan)
    return routers


def _gate_warnings(config: MoEConfig, gates: torch.Tensor) -> list[str]:
    if not gate_mode(config.gate_mode).averaged_rows:
        return []
    warning = degenerate_gate_warning(gates, [e.source_model for e in experts_with_gates(config)])
    return [warning] if warning else []


def _write_all(plan: MergePlan, gates: Future, folder: Path, options: MergeOptions,
               report: Callable[[Progress], None], cancel: CancelToken) -> list[str]:
    shards = plan.shards(options.out_shard_size)
    names = shard_names(len(shards))
    total, done, file = plan.total_bytes, 0, 0

    def advance(nbytes: int) -> None:
        nonlocal done
        done += nbytes
        files = f"{file} of {len(names)} file{'s' if len(names) > 1 else ''}"
        report(Progress("write", done, total, f"Writing {files}, {human_bytes(done)} of {human_bytes(total)}"))

    def produce(jobs: list[TensorJob]):
        for job in jobs:
            cancel.check()
            if gates.done() and gates.exception():
                _gates_of(plan, gates)  # fail fast: do not write the rest first
            yield _tensor_for(job, _gates_of(plan, gates) if job.router_layer is not None else None,
                              options.random_seed)

    for file, (name, jobs) in enumerate(zip(names, shards), start=1):
        entries = [(j.name, j.dtype, j.shape, j.nbytes) for j in jobs]
        write_shard(folder / name, entries, produce(jobs), on_bytes=advance)
    if len(shards) > 1:
        weight_map = {job.name: name for name, jobs in zip(names, shards) for job in jobs}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    _write_json(folder / "config.json", plan.moe_config)
    for path in plan.output.files():
        shutil.copyfile(path, folder / path.name)
    _write_json(folder / "generation_config.json", _generation_config(plan.base))
    if options.copy_tokenizer:
        _copy_tokenizer(plan.base, folder)
    (folder / "mergekit_moe_config.yml").write_text(dump_yaml(plan.config), encoding="utf-8")
    (folder / "README.md").write_text(card.model_card(plan), encoding="utf-8")
    return sorted(p.name for p in folder.iterdir() if p.name != destination.MARKER)


def _gates_of(plan: MergePlan, future: Future) -> torch.Tensor:
    """The computed gates, checked to be finite as the routers will be written; a failure becomes a named error."""
    try:
        gates = future.result()[0]
    except StudioError:
        raise
    except Exception as exc:
        raise _gate_failure(plan, exc) from exc
    integrity.check_routers(gates, plan)
    return gates


def _gate_failure(plan: MergePlan, exc: Exception) -> StudioError:
    """Name the usual cause of a failed gate computation, a base model with NaN or Inf weights (linear algebra
    fails on them), or else say what failed."""
    for name in plan.base.tensors:
        try:
            tensor = plan.base.read(name)
        except StudioError:
            break
        job = TensorJob(name, tuple(tensor.shape), tensor.dtype, plan.base, name)
        integrity.check_source_tensor(job, tensor)
    return StudioError(f"Computing the routers from the base model ({plan.base.label}) failed: "
                       f"{type(exc).__name__}: {exc}. Run with -v for the details; try another gate_mode.")


def _tensor_for(job: TensorJob, gates: torch.Tensor | None, seed: int | None):
    """The bytes of one output tensor: a verbatim copy when possible, else the transformed tensor."""
    if job.router_layer is not None:
        return gates[job.router_layer, job.router_row: job.router_row + job.shape[0]].to(job.dtype)
    if job.source is None:
        return torch.full(job.shape, job.fill, dtype=job.dtype)
    tensor = job.source.read(job.source_name)
    integrity.check_source_tensor(job, tensor)
    if job.is_plain_copy:
        return job.source.info(job.source_name)
    if job.noise_scale is not None:
        generator = torch.Generator().manual_seed(_noise_seed(seed, job.name))
        tensor = tensor.float() + job.noise_scale * torch.randn(tensor.shape, generator=generator)
    if job.scale is not None:
        tensor = tensor.float() * job.scale
    tensor = tensor.to(job.dtype)
    integrity.check_output_tensor(job, tensor)
    return tensor


def _noise_seed(seed: int | None, name: str) -> int:
    """A per-tensor seed: reproducible with --random-seed, different for every tensor, fresh without it."""
    if seed is None:
        return int.from_bytes(os.urandom(7), "little")
    return int.from_bytes(name.encode(), "little") % (2**61 - 1) ^ seed


def _generation_config(base: ModelSource) -> dict:
    path = base.file("generation_config.json")
    if path:
        return read_json(path, "fix or delete the base model's generation_config.json")
    keys = ("bos_token_id", "eos_token_id", "pad_token_id")
    return {k: base.config[k] for k in keys if base.config.get(k) is not None}


def _copy_tokenizer(base: ModelSource, folder: Path) -> None:
    """The base tokenizer's files, byte for byte (mergekit saves a modified, left-padding copy); only a
    tokenizer_config.json in transformers 5's own spelling is rewritten in the one 4.x reads too."""
    copied = [name for name in TOKENIZER_FILES if base.file(name)]
    if not copied:
        raise StudioError(f"base_model ({base.label}) has no tokenizer files; add them, or pass --no-copy-tokenizer.")
    for name in copied:
        if name == "tokenizer_config.json":
            write_portable_tokenizer_config(base.file(name), folder / name)
        else:
            shutil.copyfile(base.file(name), folder / name)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
