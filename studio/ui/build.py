"""The Build tab: edit a mergekit-moe config, check the models, merge with progress, log and cancel."""

from __future__ import annotations

import time
from pathlib import Path

import gradio as gr

from studio.config import load_yaml
from studio.errors import StudioError
from studio.jobs import MergeJob, MergeRunner
from studio.merge import MergeOptions
from studio.plan import compatibility, make_plan
from studio.report import COMPAT_HEADERS, compatibility_rows, estimate_rows
from studio.sources import open_models

EXAMPLES = Path(__file__).resolve().parents[2] / "assets" / "examples"
POLL_SECONDS = 0.5


def presets() -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(EXAMPLES.glob("*.yml"))}


def check_models(yaml_text: str) -> tuple[list[list[str]], list[list[str]], str]:
    """Compatibility table, estimates and a message, for the YAML in the editor."""
    try:
        config = load_yaml(yaml_text)
        sources = open_models(config.model_refs(), fetch_weights=False)
        rows, misfits = compatibility(config, sources)
        if misfits:
            return compatibility_rows(rows), [], "**Models do not fit:**\n" + "\n".join(f"- {m}" for m in misfits)
        return compatibility_rows(rows), estimate_rows(make_plan(config, sources)), "Models fit together."
    except StudioError as exc:
        return [], [], f"**Error:** {exc}"


def job_status(job: MergeJob) -> str:
    p = job.progress
    if job.state == "done":
        return f"**Done:** {job.out}"
    if job.state in ("failed", "cancelled"):
        return f"**{job.state.capitalize()}.** {job.error}"
    return f"**{p.stage}** {p.fraction:.0%} {p.message}"


def build_tab(runner: MergeRunner, workspace: Path, initial: str) -> None:
    all_presets = presets()
    with gr.Row():
        preset = gr.Dropdown(list(all_presets), value=initial, label="Preset")
        out_name = gr.Textbox(value="my-moe", label=f"Output folder (under {workspace})")
    editor = gr.Code(all_presets.get(initial, ""), language="yaml", label="Config (mergekit-moe YAML)",
                     elem_id="config-yaml")
    with gr.Row():
        check = gr.Button("Check models")
        start = gr.Button("Merge", variant="primary", elem_id="merge-button")
        stop = gr.Button("Cancel", variant="stop")
    message = gr.Markdown(elem_id="build-message")
    compat = gr.Dataframe(headers=COMPAT_HEADERS, label="Models", interactive=False)
    estimates = gr.Dataframe(headers=["", ""], label="Estimates", interactive=False)
    status = gr.Markdown(elem_id="merge-status")
    log = gr.Textbox(label="Log", lines=10, max_lines=20, autoscroll=True, elem_id="merge-log")
    current: gr.State = gr.State(None)

    preset.change(lambda name: all_presets[name], preset, editor)
    check.click(check_models, editor, [compat, estimates, message])

    def run(yaml_text: str, name: str):
        try:
            config = load_yaml(yaml_text)
        except StudioError as exc:
            yield None, f"**Error:** {exc}", ""
            return
        job = runner.start(config, workspace / (name.strip() or "my-moe"), MergeOptions())
        while not job.finished.wait(POLL_SECONDS):
            yield job, job_status(job), "\n".join(job.log)
        yield job, job_status(job), "\n".join(job.log)

    start.click(run, [editor, out_name], [current, status, log])
    stop.click(lambda job: job.cancel() if job else None, current, None)


def build_app(workspace: Path, initial: str = "zoo-4x") -> gr.Blocks:
    runner = MergeRunner()
    with gr.Blocks(title="MoE Merge Studio") as app:
        gr.Markdown("# MoE Merge Studio")
        with gr.Tab("Build"):
            build_tab(runner, workspace, initial)
    return app
