"""The merge checks what it reads and what it writes instead of trusting them.

A NaN in one source tensor, a router that overflowed when cast to float16, or a source file swapped for another
model of the same shape while the merge ran would all give a complete-looking model that is silently wrong; each
is found before the output is renamed into place, and named (model, file, tensor).
"""

from __future__ import annotations

from pathlib import Path

import torch

from studio.build.plan import MergePlan, TensorJob
from studio.errors import StudioError
from studio.sources import ModelSource, nonfinite_count

FileStamp = tuple[int, int]  # size, mtime in ns


def plan_sources(plan: MergePlan) -> list[ModelSource]:
    """Every model the plan reads, base first, each once."""
    found = {id(plan.base): plan.base}
    for job in plan.jobs:
        if job.source is not None:
            found.setdefault(id(job.source), job.source)
    return list(found.values())


def source_files(source: ModelSource) -> list[Path]:
    files = {info.path for info in source.tensors.values()}
    return sorted(files | {source.folder / "config.json"})


def stamp_sources(plan: MergePlan) -> dict[Path, tuple[str, FileStamp]]:
    """Size and mtime of every file the merge reads, taken before it reads them."""
    stamps = {}
    for source in plan_sources(plan):
        for path in source_files(source):
            stamps[path] = (source.label, _stamp(path))
    return stamps


def _stamp(path: Path) -> FileStamp | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return stat.st_size, stat.st_mtime_ns


def check_sources_unchanged(stamps: dict[Path, tuple[str, FileStamp]]) -> None:
    """Refuse the output when a source file changed (or vanished) while the merge read it: the experts could be
    a mix of two models."""
    for path, (label, before) in stamps.items():
        now = _stamp(path)
        if now != before:
            what = "was deleted" if now is None else "changed (size or modification time)"
            raise StudioError(f"Model {label}: {path} {what} while the merge was reading it, so the output could mix "
                              f"two versions of the model; it was not kept. Run the merge again once the model's "
                              f"files stay put.")


def check_source_tensor(job: TensorJob, tensor: torch.Tensor) -> None:
    """A source tensor with NaN or Inf is named before anything is written from it."""
    bad = nonfinite_count(tensor)
    if bad:
        info = job.source.info(job.source_name)
        raise StudioError(f"Model {job.source.label}: tensor {job.source_name!r} in {info.path} holds {bad:,} "
                          f"non-finite values (NaN or Inf) of {tensor.numel():,}; the model is broken (a diverged "
                          f"fine-tune, or a bad conversion). Fix or replace it; nothing was written.")


def check_output_tensor(job: TensorJob, tensor: torch.Tensor) -> None:
    """A finite source can still give a non-finite output: a huge noise_scale or residual_scale, a float16 cast."""
    bad = nonfinite_count(tensor)
    if bad:
        origin = f"from {job.source.label} ({job.source_name})" if job.source is not None else "(a router)"
        raise StudioError(f"Output tensor {job.name!r} {origin} would hold {bad:,} non-finite values (NaN or Inf) "
                          f"as {str(job.dtype).removeprefix('torch.')}: the config's noise_scale or residual_scale, "
                          f"or the dtype, is out of range for these weights. Nothing was written.")


def check_routers(gates: torch.Tensor, plan: MergePlan) -> None:
    """The routers as they will be written (in the output dtype) must be finite: NaN routers chat empty answers."""
    router_jobs = [job for job in plan.jobs if job.router_layer is not None]
    for job in router_jobs:
        rows = gates[job.router_layer, job.router_row: job.router_row + job.shape[0]].to(job.dtype)
        bad = nonfinite_count(rows)
        if bad:
            raise StudioError(f"Router {job.name!r} would hold {bad:,} non-finite values (NaN or Inf): the base model "
                              f"({plan.base.label}) gives non-finite hidden states for the prompts, or its weights "
                              f"hold NaN or Inf. Check the base model, or use another gate_mode. Nothing was written.")
