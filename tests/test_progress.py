"""A merge's progress bar: each stage's share, labels a person reads, and a bar that is full only when done."""

from __future__ import annotations

import pytest
import yaml

from studio.app.jobs import MergeJob, MergeRunner
from studio.app.progress import DOWNLOAD_SHARE, FINISH_SHARE, MergeBar
from studio.app.ui.build import job_progress
from studio.build.merge import MergeOptions, Progress
from studio.config import load_yaml
from studio.gate_modes import gate_mode

from conftest import moe_yaml


def test_every_gate_mode_has_its_phases():
    from studio.gate_modes import MODES

    for mode in MODES.values():  # a mode that runs a model gets a share of the bar for that pass
        assert bool(mode.phases) == (mode.runs in ("base", "merged")), mode.name
    for mode in MODES:
        for hub in (False, True):
            assert abs(sum(MergeBar.for_merge(mode, hub).shares.values()) - 1) < 1e-9


def test_writing_everything_before_the_routers_is_not_a_full_bar():
    bar = MergeBar.for_merge("hidden", from_hub=False)
    bar.update(Progress("open", 0, 1, "Opening models"))
    assert (bar.fraction, bar.label) == (0, "Opening models")
    bar.update(Progress("write", 50, 100, "Writing 1 of 2 files, 50 B of 100 B"))
    write = 1 - 0.6 - FINISH_SHARE
    assert bar.fraction == write * 0.5
    assert bar.label == "Router pass: preparing · Writing 1 of 2 files, 50 B of 100 B"
    bar.update(Progress("hidden", 1, 4, "Hidden states of the prompts: layer 1 of 4"))
    bar.update(Progress("write", 100, 100, "Writing 2 of 2 files, 100 B of 100 B"))
    assert bar.fraction == 0.6 * 0.25 + write
    assert bar.label == "Hidden states of the prompts: layer 1 of 4"  # writing is over: only the pass is named
    bar.update(Progress("hidden", 4, 4, "Hidden states of the prompts: layer 4 of 4"))
    assert bar.fraction == 1 - FINISH_SHARE and bar.label == "Checking the files and moving them into place"
    bar.update(Progress("done", 100, 100, "Merged into out"))
    assert (bar.fraction, bar.label) == (1.0, "Merged into out")


def test_downloads_take_their_share_until_the_next_stage():
    bar = MergeBar.for_merge("expert_text", from_hub=True)
    bar.update(Progress("download", 0, 0, "Downloading from the Hub (Downloading bytes): 0 B"))
    assert bar.fraction == 0  # a size not known yet is not a download done
    bar.update(Progress("download", 5, 10, "model.safetensors"))
    assert bar.fraction == DOWNLOAD_SHARE * 0.5 and bar.label == "model.safetensors"
    bar.update(Progress("text", 1, 4, "Experts writing calibration text: 1 of 4 done"))
    text_share = dict(gate_mode("expert_text").phases)["text"]
    assert bar.fraction == DOWNLOAD_SHARE + (1 - DOWNLOAD_SHARE) * text_share * 0.25
    assert bar.label == "Experts writing calibration text: 1 of 4 done"


def test_a_real_merge_reports_its_stages_and_a_cancelled_one_stays_grey(mistral, tmp_path):
    base, experts = mistral
    config = load_yaml(yaml.safe_dump(moe_yaml(base, experts, gate_mode="hidden")))
    seen = []
    runner = MergeRunner()
    job = runner.start(config, tmp_path / "out", MergeOptions(out_shard_size=100_000))
    original = job.bar.update
    job.bar.update = lambda p: (original(p), seen.append((p.stage, p.message, job.bar.fraction)))
    assert job.finished.wait(120) and job.state == "done"
    stages = [stage for stage, _, _ in seen]
    assert "hidden" in stages and "write" in stages and stages[-1] == "done"
    layers = [message for stage, message, _ in seen if stage == "hidden"]
    assert layers[-1] == "Hidden states of the prompts: layer 2 of 2"
    writes = [message for stage, message, _ in seen if stage == "write"]
    files = len([n for n in job.result.files if n.endswith(".safetensors")])
    assert writes[-1].startswith(f"Writing {files} of {files} files, ")
    assert all(fraction < 1 for stage, _, fraction in seen if stage != "done")
    assert 'data-state="done"' in job_progress(job) and 'data-fraction="1.000"' in job_progress(job)

    cancelled = runner.start(config, tmp_path / "cancelled")
    cancelled.cancel()
    assert cancelled.finished.wait(60) and cancelled.state == "cancelled"
    shown = job_progress(cancelled)
    assert 'data-state="cancelled"' in shown and 'data-fraction="0.000"' in shown and "Cancelled at 0%" in shown


def test_refinement_has_its_share_after_the_weights_are_written():
    bar = MergeBar.for_merge("expert_text", from_hub=False)
    for stage in ("text", "fit", "write"):
        bar.update(Progress(stage, 4, 4, f"{stage} done"))
    bar.update(Progress("refine", 5, 20, "Refining the routers end to end: step 5 of 20"))
    refine_share = dict(gate_mode("expert_text").phases)["refine"]
    assert bar.fraction == pytest.approx(1 - FINISH_SHARE - refine_share * 15 / 20)
    assert bar.label == "Refining the routers end to end: step 5 of 20"


def test_a_merge_that_reported_done_is_not_full_until_its_job_has_finished(mistral, tmp_path):
    base, experts = mistral
    job = MergeJob(load_yaml(yaml.safe_dump(moe_yaml(base, experts, gate_mode="hidden"))), tmp_path / "out",
                   MergeOptions())
    for stage in ("open", "hidden", "write", "done"):  # the merge's last report, before its thread ends the job
        job.progress = Progress(stage, 1, 1, f"{stage} done")
        job.bar.update(job.progress)
    assert job.bar.fraction == 1.0 and job.state == "running"
    assert 'data-state="running"' in job_progress(job) and 'data-fraction="0.990"' in job_progress(job)
