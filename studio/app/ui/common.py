"""Pieces every tab uses: readable errors, the progress bar, the model picker and loading with progress."""

from __future__ import annotations

import html
import threading
from pathlib import Path
from typing import Callable, Iterator

import gradio as gr

from studio.app.workspace import finished_merges
from studio.errors import StudioError
from studio.inspect.chat import ChatModel
from studio.inspect.loaded import LoadedModel
from studio.sources import progress_tqdm

MODEL_QUEUE = dict(concurrency_id="model", concurrency_limit=1)  # chat, compare, evaluate share one loaded model
PRECISIONS = [("4-bit (NF4)", "4bit"), ("8-bit", "8bit"), ("bf16", "bf16"), ("fp32", "fp32")]
TEST_PROMPTS = "def add(a, b):\n---\n12 + 7 =\n---\nOnce upon a time"  # one per zoo domain, `---` between


def error_text(exc: BaseException) -> str:
    """An exception as one readable line for the page (never a traceback)."""
    if isinstance(exc, StudioError):
        return f"**Error:** {exc}"
    return f"**Unexpected error:** {type(exc).__name__}: {exc}"


def progress_html(fraction: float, label: str, state: str = "running") -> str:
    """The bar; `state` (running, done, failed, cancelled, queued) gives its colour: only a finished merge is green."""
    fraction = min(max(fraction, 0.0), 1.0)
    return (f'<div class="studio-progress {state}" data-fraction="{fraction:.3f}" data-state="{state}">'
            f'<div class="studio-progress-bar" style="width:{fraction:.1%}"></div>'
            f'<span>{html.escape(label)}</span></div>')


def model_choices(workspace: Path) -> list[str]:
    return [str(m.path) for m in finished_merges(workspace)]


class ModelPicker:
    """Model (a workspace merge, any folder or a Hub id), precision and the remote-code tick, with a load button,
    and a line naming the model loaded now. `follow(chat, fresh)` gives the values of the `followers` widgets once
    a model is loaded (a tab's settings that depend on the model)."""

    def __init__(self, workspace: Path, prefix: str, loaded: LoadedModel,
                 follow: Callable[[ChatModel, bool], list] | None = None) -> None:
        self.workspace = workspace
        self.loaded = loaded
        self.followers: list = []  # set by the tab before wire_load, for `follow`
        self.follow = follow
        with gr.Row(equal_height=True):
            self.model = gr.Dropdown(label="Model (a merge in the workspace, a folder or a Hub id)",
                                     allow_custom_value=True, scale=4, elem_id=f"{prefix}-model")
            self.refresh = gr.Button("↻", scale=0, min_width=40, size="sm")
            self.precision = gr.Radio(PRECISIONS, value="4bit", label="Precision", scale=3,
                                      elem_id=f"{prefix}-precision")
        with gr.Row(equal_height=True):
            self.trust = gr.Checkbox(label="Trust remote code (runs Python code from the model's repository)",
                                     scale=3)
            self.load = gr.Button("Load", scale=1, elem_id=f"{prefix}-load")
        self.current = gr.Markdown(loaded_now(loaded), elem_id=f"{prefix}-loaded", elem_classes="loaded-now")
        self.status = gr.Markdown(elem_id=f"{prefix}-status")
        self.refresh.click(self.choices, self.model, self.model)

    def wire_load(self) -> None:
        """Wire the Load button; after the tab has made its `followers`."""
        self.load.click(self.load_messages, self.inputs, [self.status, self.current, *self.followers], **MODEL_QUEUE)

    @property
    def inputs(self) -> list:
        return [self.model, self.precision, self.trust]

    def choices(self, current: str | None = None):
        paths = model_choices(self.workspace)
        return gr.update(choices=paths, value=current or (paths[0] if paths else None))

    def load_messages(self, model: str, precision: str, trust: bool) -> Iterator[dict]:
        """{widget: value} while the model loads, then its status and what the tab's `followers` show of it."""
        try:
            for step in load_with_progress(self.loaded, model, precision, trust):
                if isinstance(step, str):
                    yield {self.status: step}
        except Exception as exc:  # shown as a message
            yield {self.status: error_text(exc), self.current: loaded_now(self.loaded)}
            return
        follow = self.follow(*step) if self.follow else {}
        yield {self.status: loaded_status(*step), self.current: loaded_now(self.loaded), **follow}


def loaded_now(loaded: LoadedModel) -> str:
    """A line naming the model both tabs use now."""
    chat = loaded.current
    return f"Loaded now: {chat.describe()}" if chat else "No model loaded yet: pick one and press Load (or just send)."


def loaded_status(chat: ChatModel, fresh: bool) -> str:
    return f"{'Loaded' if fresh else 'Reusing'} {chat.describe()}"


def run_reporting(work: Callable[[Callable[[str], None]], object], first: str) -> Iterator[str | tuple]:
    """Run work(report) on a thread: yields the newest line it reported (`first` until it reports) every half
    second while it runs, then a 1-tuple holding its result. Its exception is raised here."""
    state: dict = {"line": first}

    def run() -> None:
        try:
            state["result"] = work(lambda line: state.__setitem__("line", line))
        except BaseException as exc:  # handed to the page's thread below
            state["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="studio-work")
    thread.start()
    while thread.is_alive():
        yield state["line"]
        thread.join(0.5)
    if "error" in state:
        raise state["error"]
    yield (state["result"],)


def load_with_progress(loaded: LoadedModel, model: str | None, precision: str,
                       trust: bool) -> Iterator[str | tuple[ChatModel, bool]]:
    """Status lines while the model loads (with Hub download progress), then (the ChatModel, whether it was
    loaded now rather than reused). Raises StudioError."""
    if not model or not str(model).strip():
        raise StudioError("Pick a model: a merge from the list, a local folder or a Hub id.")

    def load(report: Callable[[str], None]) -> tuple[ChatModel, bool]:
        def download(what: str, done: int, total: int) -> None:
            report(f"Downloading {model}: {what} {done}/{total}")

        return loaded.get(str(model), precision, trust, progress_tqdm(download))

    for step in run_reporting(load, f"Loading {model} at {precision}…"):
        yield step if isinstance(step, str) else step[0]
