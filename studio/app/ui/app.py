"""The whole studio: Build, Chat and Inspect tabs over one workspace, one merge runner and one loaded model."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from studio.app.jobs import MergeRunner
from studio.app.ui.build import BuildTab
from studio.app.ui.chat import ChatTab
from studio.app.ui.common import loaded_now
from studio.app.ui.inspect import InspectTab
from studio.inspect.loaded import LoadedModel

CSS = """
.gradio-container {max-width: 1500px !important}
.field-msg {color: #b42318; font-size: 0.9em; min-height: 0}
.field-msg:empty {display: none}
.panel {border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 10px}
.studio-progress {position: relative; height: 26px; border-radius: 6px; background: var(--block-background-fill);
  border: 1px solid var(--border-color-primary); overflow: hidden}
.studio-progress-bar {position: absolute; inset: 0 auto 0 0; background: #6366f1; opacity: 0.45}
.studio-progress.done .studio-progress-bar {background: #22c55e}
.studio-progress.failed .studio-progress-bar, .studio-progress.cancelled .studio-progress-bar {background: #9ca3af}
.studio-progress span {position: relative; padding-left: 10px; line-height: 26px; font-size: 0.9em}
.router-text > div:first-child span {display: inline-block; margin-bottom: 2px}
.expert-buttons button {flex: 1}
#chatbot .message-content {white-space: pre-wrap}
.loaded-now {color: var(--body-text-color-subdued); font-size: 0.9em}
.token-columns {display: grid; grid-template-columns: repeat(auto-fit, minmax(260px, 1fr)); gap: 12px}
"""
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="emerald")


def build_app(workspace: Path, initial: str = "zoo-4x", device: str = "auto",
              runner: MergeRunner | None = None) -> gr.Blocks:
    """The studio's page. Merges go into `workspace` and run one at a time on `runner`; `initial` is the preset
    the Build tab opens with; chat models run on `device`."""
    runner = runner or MergeRunner()
    loaded = LoadedModel(device)
    with gr.Blocks(title="MoE Merge Studio") as app:
        gr.Markdown("# MoE Merge Studio\nBuild a Mixture of Experts from fine-tunes of one base model, merge it, "
                    "chat with it and see which expert fires.")
        with gr.Tab("Build", elem_id="tab-build"):
            build = BuildTab(runner, workspace, initial)
        with gr.Tab("Chat", elem_id="tab-chat") as chat_tab:
            chat = ChatTab(loaded, workspace)
        with gr.Tab("Inspect", elem_id="tab-inspect") as inspect_tab:
            inspect = InspectTab(loaded, workspace)
        app.load(build.on_load, None, build.load_outputs)
        for tab, picker in ((chat_tab, chat.picker), (inspect_tab, inspect.picker)):
            app.load(picker.choices, None, picker.model)
            tab.select(picker.choices, picker.model, picker.model)
            tab.select(lambda: loaded_now(loaded), None, picker.current, queue=False)
    return app


def launch(app: gr.Blocks, **kwargs):
    """Start the server with the studio's look; kwargs go to Blocks.launch (server_name, server_port, ...)."""
    return app.queue().launch(theme=THEME, css=CSS, **kwargs)
