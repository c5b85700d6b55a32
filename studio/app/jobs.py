"""Run merges in the background, one at a time, with a log, progress and cancel: what the UI polls."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from studio.app.progress import MergeBar
from studio.build.merge import CancelToken, MergeOptions, MergeResult, Progress, merge
from studio.config import MoEConfig
from studio.errors import Cancelled, StudioError

JobState = Literal["queued", "running", "done", "cancelled", "failed"]


@dataclass
class MergeJob:
    """One merge running on a worker thread. Read its fields from any thread; they only grow."""

    config: MoEConfig
    out: Path
    options: MergeOptions
    log: list[str] = field(default_factory=list)
    progress: Progress = field(default_factory=lambda: Progress("queued", 0, 1, "Waiting for the merge before it"))
    result: MergeResult | None = None
    error: str | None = None
    token: CancelToken = field(default_factory=CancelToken)
    finished: threading.Event = field(default_factory=threading.Event)
    bar: MergeBar | None = None
    started: float | None = None  # time.monotonic() when it began, and ended
    ended: float | None = None

    def __post_init__(self) -> None:
        if self.bar is None:
            self.bar = MergeBar.for_config(self.config)

    def cancel(self) -> None:
        self.token.cancel()
        self.log.append("Cancel requested; stopping at the next tensor.")

    @property
    def seconds(self) -> float:
        """How long it has run (or ran)."""
        if self.started is None:
            return 0.0
        return (self.ended or time.monotonic()) - self.started

    @property
    def state(self) -> JobState:
        if not self.finished.is_set():
            return "queued" if self.progress.stage == "queued" else "running"
        return "done" if self.result else ("cancelled" if self.token.cancelled else "failed")


class MergeRunner:
    """Starts merges on threads; a lock makes them run one after another, in order."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.jobs: list[MergeJob] = []

    def busy(self) -> bool:
        return any(not job.finished.is_set() for job in self.jobs)

    def start(self, config: MoEConfig, out: str | Path, options: MergeOptions | None = None) -> MergeJob:
        job = MergeJob(config, Path(out), options or MergeOptions())
        if self.busy():
            job.log.append("Another merge is running; this one starts when it ends.")
        self.jobs.append(job)
        threading.Thread(target=self._run, args=(job,), daemon=True, name=f"merge-{job.out.name}").start()
        return job

    def _run(self, job: MergeJob) -> None:
        with self._lock:
            stamp, job.started = time.strftime("%H:%M:%S"), time.monotonic()
            job.log.append(f"[{stamp}] Merging into {job.out}")
            try:
                job.token.check()
                job.result = merge(job.config, job.out, job.options, progress=self._on_progress(job),
                                   cancel=job.token, log=job.log.append)
            except Cancelled as exc:
                job.error = str(exc)
            except StudioError as exc:
                job.error = str(exc)
            except Exception as exc:  # shown to the user as text, never as a traceback
                job.error = f"Unexpected error: {type(exc).__name__}: {exc}"
            finally:
                if job.error:
                    job.log.append(job.error)
                job.ended = time.monotonic()
                job.finished.set()

    @staticmethod
    def _on_progress(job: MergeJob):
        def update(progress: Progress) -> None:
            job.progress = progress
            job.bar.update(progress)

        return update
