"""The Build tab: the config as a form and as YAML (kept in sync), model checks, merging, finished merges, Hub."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import gradio as gr

from studio.app import form
from studio.app.hub import push_to_hub
from studio.app.jobs import MergeJob, MergeRunner
from studio.app.ui.common import TEST_PROMPTS, error_text, progress_html
from studio.app.workspace import MERGE_HEADERS, finished_merges, output_folder
from studio.build.merge import MergeOptions
from studio.build.outputs import output_names
from studio.build.plan import compatibility, make_plan
from studio.build.preview import preview_routing, summary_rows
from studio.build.report import COMPAT_HEADERS, compatibility_rows, estimate_rows
from studio.config import DTYPES, GATE_MODES, PROMPT_FORMATS, check_rules, load_yaml, to_yaml
from studio.errors import StudioError
from studio.inspect.plots import compare_heatmaps, token_text_html
from studio.sources import open_models

EXAMPLES = Path(__file__).resolve().parents[3] / "assets" / "examples"
POLL_SECONDS = 0.5
AREAS = ("base", "settings", "experts", "expert", "shared", "config")
AUTO = "(automatic)"


def presets() -> dict[str, str]:
    return {p.stem: p.read_text(encoding="utf-8") for p in sorted(EXAMPLES.glob("*.yml"))}


def check_models(yaml_text: str, allow_identical_experts: bool = False) -> tuple[list[list[str]], list[list[str]], str]:
    """Compatibility table, estimates and a message, for the YAML in the editor; the config's own rules first,
    so that a broken config is named before any Hub model is fetched."""
    try:
        config = load_yaml(yaml_text)
        errors = check_rules(config, allow_identical_experts)[0]
        if errors:
            return [], [], "**The config breaks these rules:**\n" + "\n".join(f"- {e}" for e in errors)
        sources = open_models(config.model_refs(), fetch_weights=False)
        rows, misfits = compatibility(config, sources)
        if misfits:
            return compatibility_rows(rows), [], "**Models do not fit:**\n" + "\n".join(f"- {m}" for m in misfits)
        return compatibility_rows(rows), estimate_rows(make_plan(config, sources)), "Models fit together."
    except StudioError as exc:
        return [], [], f"**Error:** {exc}"


def job_status(job: MergeJob) -> str:
    if job.state == "done":
        return f"**Done:** {job.out}"
    if job.state in ("failed", "cancelled"):
        return f"**{job.state.capitalize()}.** {job.error}"
    if job.state == "queued":
        return "**Queued:** waiting for the merge before it."
    return f"**Merging** into {job.out.name}: {job.seconds:.0f} s"


RUNNING_AT_MOST = 0.99  # of the bar, while the job has not finished


def job_progress(job: MergeJob) -> str:
    """The bar of a merge: full and green only once it is done; a stopped one stays where it stopped, grey."""
    state, bar = job.state, job.bar
    if state == "done":
        return progress_html(1.0, f"Done in {job.seconds:.1f} s", state)
    if state in ("failed", "cancelled"):
        return progress_html(bar.fraction, f"{state.capitalize()} at {bar.fraction:.0%}", state)
    if state == "queued":
        return progress_html(0.0, "Queued: waiting for the merge before it", state)
    # The merge reports "done" just before its thread marks the job finished: until then the bar is not full.
    fraction = min(bar.fraction, RUNNING_AT_MOST)
    return progress_html(fraction, f"{fraction:.0%} · {bar.label}", state)


def _number(value) -> float | int | None:
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _choice(value) -> str:
    return "" if value is None else str(value)


class BuildTab:
    """The widgets of the Build tab and their wiring. Every handler calls studio functions tested without UI."""

    def __init__(self, runner: MergeRunner, workspace: Path, initial: str) -> None:
        self.runner = runner
        self.workspace = workspace
        self.presets = presets()
        self.downloads = Path(tempfile.mkdtemp(prefix="moe-studio-config-"))
        text = self.initial_text = self.presets.get(initial, "")
        self.data = gr.State(form.parse_mapping(text) if text else {})
        self._layout(initial, text)
        self._wire()

    # Layout ---------------------------------------------------------------------------------------------------
    def _layout(self, initial: str, text: str) -> None:
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, elem_classes="panel"):
                self._form_widgets(initial)
            with gr.Column(scale=4, elem_classes="panel"):
                self.editor = gr.Code(text, language="yaml", label="Config (mergekit-moe YAML)", lines=28,
                                      max_lines=40, wrap_lines=True, elem_id="config-yaml")
                self.messages["config"] = gr.Markdown(elem_id="msg-config", elem_classes="field-msg")
        self._preview_widgets()
        self._merge_widgets()
        self._finished_widgets()

    def _form_widgets(self, initial: str) -> None:
        self.messages: dict[str, gr.Markdown] = {}
        with gr.Row():
            self.preset = gr.Dropdown(list(self.presets), value=initial, label="Preset", scale=3, elem_id="preset")
            self.upload = gr.UploadButton("Upload YAML", file_types=[".yml", ".yaml"], scale=1, elem_id="upload-yaml")
            self.download = gr.DownloadButton("Download YAML", scale=1, elem_id="download-yaml")
        self.base = gr.Textbox(label="Base model (local folder or Hub id)", elem_id="base-model")
        self.messages["base"] = gr.Markdown(elem_id="msg-base", elem_classes="field-msg")
        with gr.Row():
            self.gate_mode = gr.Dropdown(list(GATE_MODES), label="Gate mode", allow_custom_value=True,
                                         elem_id="gate-mode")
            self.dtype = gr.Dropdown([(AUTO, ""), *DTYPES], label="dtype", allow_custom_value=True, elem_id="dtype")
            self.per_token = gr.Number(label="Experts per token", precision=0, minimum=1, elem_id="experts-per-token")
            self.architecture = gr.Dropdown([(AUTO, ""), *output_names()], label="Output architecture",
                                            allow_custom_value=True, elem_id="architecture")
            self.prompt_format = gr.Dropdown(list(PROMPT_FORMATS), label="Prompt format (chat: in the template)",
                                             allow_custom_value=True, elem_id="prompt-format")
        self.messages["settings"] = gr.Markdown(elem_id="msg-settings", elem_classes="field-msg")
        with gr.Group(elem_classes="experts"):
            self.picker = gr.Dropdown(label="Experts (pick one to edit it below)", type="index",
                                      elem_id="expert-picker")
            with gr.Row(elem_classes="expert-buttons"):
                self.up = gr.Button("↑ Move up", size="sm", min_width=80)
                self.down = gr.Button("↓ Move down", size="sm", min_width=80)
                self.add = gr.Button("+ Add expert", size="sm", min_width=80, elem_id="add-expert")
                self.remove = gr.Button("− Remove", size="sm", min_width=80, variant="stop", elem_id="remove-expert")
            self.source = gr.Textbox(label="Source model of this expert", elem_id="expert-source")
            with gr.Row():
                self.positive = gr.Textbox(label="Positive prompts (a line with only --- between prompts)", lines=5,
                                           max_lines=12, elem_id="expert-positive")
                self.negative = gr.Textbox(label="Negative prompts", lines=5, max_lines=12, elem_id="expert-negative")
            with gr.Row():
                self.noise = gr.Number(label="noise_scale", elem_id="expert-noise")
                self.residual = gr.Number(label="residual_scale", elem_id="expert-residual")
            self.calibration = gr.Textbox(
                label="calibration_text: text of this expert's domain, one file per line: a path, or a Hub "
                      "dataset's file as hf://datasets/OWNER/NAME/train.jsonl#field (expert_text modes; without "
                      "them the expert writes its own text from its prompts)",
                lines=2, max_lines=6, elem_id="expert-calibration")
        self.messages["expert"] = gr.Markdown(elem_id="msg-expert", elem_classes="field-msg")
        self.messages["experts"] = gr.Markdown(elem_id="msg-experts", elem_classes="field-msg")
        with gr.Accordion("Shared expert (optional, Qwen2-MoE style)", open=False):
            self.shared_source = gr.Textbox(label="Source model of the shared expert (empty: none)",
                                            elem_id="shared-source")
            self.shared_positive = gr.Textbox(label="Its positive prompts", lines=3)
        self.messages["shared"] = gr.Markdown(elem_id="msg-shared", elem_classes="field-msg")

    def _preview_widgets(self) -> None:
        with gr.Accordion("Preview routing before merging", open=False, elem_id="preview-panel"):
            gr.Markdown("Which expert each layer would choose for the tokens of test prompts, computed from the "
                        "config above through the base and the experts, without writing a merge.")
            with gr.Row(equal_height=False):
                with gr.Column(scale=2):
                    self.preview_prompts = gr.Textbox(value=TEST_PROMPTS,
                                                      label="Test prompts (a line with only --- between prompts)",
                                                      lines=6, elem_id="preview-prompts")
                    self.preview_button = gr.Button("Preview routing", elem_id="preview-button")
                    self.preview_message = gr.Markdown(elem_id="preview-message")
                with gr.Column(scale=5):
                    self.preview_table = gr.Dataframe(label="Per layer: the expert most prompt tokens go to first",
                                                      interactive=False, elem_id="preview-table")
                    self.preview_figure = gr.Plot(label="Mean router probability per layer", elem_id="preview-figure")
                    self.preview_tokens = gr.HTML(elem_id="preview-tokens")

    def _merge_widgets(self) -> None:
        with gr.Row(equal_height=True):
            self.out_name = gr.Textbox(value="my-moe", label=f"Output folder (in {self.workspace})", scale=3,
                                       elem_id="out-name")
            with gr.Column(scale=3, min_width=260):
                self.overwrite = gr.Checkbox(label="Overwrite an existing merge of that name")
                self.trust = gr.Checkbox(label="Trust remote code (runs Python code shipped with the models)")
                self.identical = gr.Checkbox(label="Allow identical experts (I will train the result)")
                self.refine = gr.Checkbox(value=True, label="Refine the routers end to end (expert_text, when "
                                                            "the merged model fits)", elem_id="refine-routers")
        with gr.Row():
            self.check = gr.Button("Check models", elem_id="check-models")
            self.start = gr.Button("Merge", variant="primary", elem_id="merge-button")
            self.stop = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
        self.progress = gr.HTML(progress_html(0, "No merge yet"), elem_id="merge-progress")
        self.status = gr.Markdown(elem_id="merge-status")
        self.log = gr.Textbox(label="Log", lines=6, max_lines=14, autoscroll=True, elem_id="merge-log")
        self.check_message = gr.Markdown(elem_id="check-message")
        self.compat = gr.Dataframe(headers=COMPAT_HEADERS, label="Models", interactive=False, elem_id="compat-table")
        self.estimates = gr.Dataframe(headers=["estimate", "value"], label="Estimates", interactive=False,
                                      elem_id="estimates")
        self.current = gr.State(None)

    def _finished_widgets(self) -> None:
        with gr.Row(equal_height=True):
            gr.Markdown("### Finished merges")
            self.refresh = gr.Button("↻ Refresh", size="sm", scale=0)
        self.merges = gr.Dataframe(headers=MERGE_HEADERS, label="In the workspace", interactive=False,
                                   elem_id="finished-merges")
        with gr.Accordion("Push a merge to the Hugging Face Hub", open=False):
            with gr.Row():
                self.push_merge = gr.Dropdown(label="Merge", scale=2, elem_id="push-merge")
                self.repo = gr.Textbox(label="Repository (your-name/model-name)", scale=2, elem_id="push-repo")
                self.token = gr.Textbox(label="Token with write access (used for this push only, never stored)",
                                        type="password", scale=2, elem_id="push-token")
                self.private = gr.Checkbox(value=True, label="Private", scale=0)
            self.push = gr.Button("Push to Hub", elem_id="push-button")
            self.push_message = gr.Markdown(elem_id="push-message")

    # Views ----------------------------------------------------------------------------------------------------
    @property
    def form_widgets(self) -> list:
        return [self.base, self.gate_mode, self.dtype, self.per_token, self.architecture, self.prompt_format,
                self.picker, self.source,
                self.positive, self.negative, self.noise, self.residual, self.calibration, self.shared_source,
                self.shared_positive]

    @property
    def message_widgets(self) -> list:
        return [self.messages[a] for a in AREAS]

    def form_values(self, data: dict, selected: int) -> dict:
        expert = form.expert_view(data, selected)
        shared = form.expert_view(data, 0, "shared_experts")
        names = form.expert_names(data)
        picked = names[selected] if 0 <= selected < len(names) else None
        return dict(zip(self.form_widgets, [
            str(data.get("base_model") or ""), _choice(data.get("gate_mode")), _choice(data.get("dtype")),
            _number(data.get("experts_per_token", 2)), _choice(data.get("architecture")),
            data.get("prompt_format", "raw"), gr.update(choices=names, value=picked), expert.source_model,
            expert.positive_prompts, expert.negative_prompts, _number(expert.noise_scale),
            _number(expert.residual_scale), expert.calibration_text, shared.source_model, shared.positive_prompts]))

    def message_values(self, data: dict, selected: int, identical: bool) -> dict:
        areas = form.messages_by_area(form.field_problems(data, identical), selected)
        return {self.messages[a]: areas[a] for a in AREAS}

    # Handlers: each returns {widget: value}; a widget left out keeps what it shows --------------------------------
    def rewritten(self, text: str, data: dict, selected: int, identical: bool) -> dict:
        """The editor's new text after a form edit, and the messages (saying so when comments were dropped)."""
        yaml_text, note = form.rewritten_yaml(text or "", data)
        messages = self.message_values(data, selected, identical)
        config = self.messages["config"]
        messages[config] = "\n".join(m for m in (messages[config], note) if m)
        return {self.editor: yaml_text, **messages}

    def _field(self, key: str):
        def edit(data: dict, value, selected: int, identical: bool, text: str) -> dict:
            data = form.set_field(data, key, value)
            return {self.data: data, self.picker: gr.update(choices=form.expert_names(data)),
                    **self.rewritten(text, data, selected, identical)}

        return edit

    def _expert_field(self, key: str, group: str = "experts"):
        def edit(data: dict, value, selected: int | None, identical: bool, text: str) -> dict:
            selected = selected or 0
            try:
                data = form.set_expert_field(data, selected if group == "experts" else 0, key, value, group)
            except StudioError as exc:  # nothing selected: there are no experts yet
                return {self.messages["config"]: f"- {exc}"}
            names = form.expert_names(data)
            shown = group == "experts" and selected < len(names)
            picker = gr.update(choices=names, value=names[selected]) if shown else gr.update(choices=names)
            return {self.data: data, self.picker: picker, **self.rewritten(text, data, selected, identical)}

        return edit

    def _restructure(self, change, rewrite: bool = True):
        """A change of the experts' list (or, without `rewrite`, only of which expert the form shows)."""
        def edit(data: dict, selected: int, identical: bool, text: str) -> dict:
            data, selected = change(data, selected or 0)
            selected = max(0, min(selected, len(form.expert_names(data)) - 1))
            messages = self.rewritten(text, data, selected, identical) if rewrite else \
                self.message_values(data, selected, identical)
            return {self.data: data, **self.form_values(data, selected), **messages}

        return edit

    def from_yaml(self, text: str, selected: int | None, identical: bool) -> dict:
        """The editor's text into the form, or its parse error next to the editor (the form keeps its values)."""
        try:
            data = form.parse_mapping(text)
        except StudioError as exc:
            return {self.messages["config"]: f"- {exc}"}
        selected = max(0, min(selected or 0, len(form.expert_names(data)) - 1))
        return {self.data: data, **self.form_values(data, selected), **self.message_values(data, selected, identical)}

    def load_text(self, text: str, identical: bool) -> dict:
        return {**self.from_yaml(text, 0, identical), self.editor: text}

    def save_download(self, text: str) -> str:
        """The editor's text as a file for the download button, named by its content so that sessions never
        hand each other their configs."""
        path = self.downloads / hashlib.sha256(text.encode()).hexdigest()[:16] / "moe-config.yml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return str(path)

    def run(self, yaml_text: str, name: str, overwrite: bool, trust: bool, identical: bool, refine: bool = True):
        try:
            config = load_yaml(yaml_text)
            out = output_folder(self.workspace, name)
        except StudioError as exc:
            yield None, progress_html(0, "Not started", "failed"), f"**Error:** {exc}", ""
            return
        options = MergeOptions(overwrite=overwrite, trust_remote_code=trust, allow_identical_experts=identical,
                               refine_routers=refine)
        job = self.runner.start(config, out, options)
        while not job.finished.wait(POLL_SECONDS):
            yield job, job_progress(job), job_status(job), "\n".join(job.log)
        yield job, job_progress(job), job_status(job), "\n".join(job.log)

    def preview(self, yaml_text: str, prompts_text: str, trust: bool) -> dict:
        """The routing preview of the editor's config: table, side-by-side heatmaps, tokens coloured at the last
        layer, and a message (an error, never a traceback)."""
        try:
            config = load_yaml(yaml_text)
            prompts = form.text_to_prompts(prompts_text)
            if not prompts:
                raise StudioError("Write at least one test prompt.")
            traces = preview_routing(config, prompts, MergeOptions(trust_remote_code=trust), log=lambda m: None)
        except Exception as exc:  # shown as text, never as a traceback
            return {self.preview_message: error_text(exc)}
        rows = summary_rows(prompts, traces)
        table = gr.update(value=rows, headers=["prompt", *(f"L{layer}" for layer in traces[0].layers)])
        tokens = "".join(token_text_html(trace, trace.layers[-1]) for trace in traces)
        figure = compare_heatmaps(traces, prompts)
        return {self.preview_table: table, self.preview_figure: figure, self.preview_tokens: tokens,
                self.preview_message: f"Preview of `{config.gate_mode}` gates for {len(prompts)} prompt(s)."}

    def merge_list(self):
        merges = finished_merges(self.workspace)
        paths = [str(m.path) for m in merges]
        return [m.row() for m in merges], gr.update(choices=paths, value=paths[0] if paths else None)

    @staticmethod
    def push_merge_to_hub(folder: str | None, repo: str, token: str, private: bool) -> str:
        log: list[str] = []
        try:
            if not folder:
                raise StudioError("Pick a finished merge to push.")
            url = push_to_hub(folder, repo, token, private, log=log.append)
            return "\n".join(f"- {line}" for line in log) + f"\n\n**Pushed:** {url}"
        except Exception as exc:  # shown as text, never as a traceback
            return "\n".join(f"- {line}" for line in log) + f"\n\n{error_text(exc)}"

    def _wire(self) -> None:
        state = [self.data]
        synced = [self.data, self.editor, self.picker, *self.message_widgets]
        every = dict(trigger_mode="always_last", show_progress="hidden")
        for widget, key in [(self.base, "base_model"), (self.gate_mode, "gate_mode"), (self.dtype, "dtype"),
                            (self.per_token, "experts_per_token"), (self.architecture, "architecture"),
                            (self.prompt_format, "prompt_format")]:
            widget.input(self._field(key), [*state, widget, self.picker, self.identical, self.editor], synced,
                         **every)
        for widget, key in [(self.source, "source_model"), (self.positive, "positive_prompts"),
                            (self.negative, "negative_prompts"), (self.noise, "noise_scale"),
                            (self.residual, "residual_scale"), (self.calibration, "calibration_text")]:
            widget.input(self._expert_field(key), [*state, widget, self.picker, self.identical, self.editor], synced,
                         **every)
        for widget, key in [(self.shared_source, "source_model"), (self.shared_positive, "positive_prompts")]:
            widget.input(self._expert_field(key, "shared_experts"),
                         [*state, widget, self.picker, self.identical, self.editor], synced, **every)

        whole = [self.data, self.editor, *self.form_widgets, *self.message_widgets]
        changes = {self.add: lambda d, s: (form.add_expert(d), len(form.expert_names(d))),
                   self.remove: lambda d, s: (form.remove_expert(d, s), s),
                   self.up: lambda d, s: (form.move_expert(d, s, -1), s - 1),
                   self.down: lambda d, s: (form.move_expert(d, s, +1), s + 1)}
        for button, change in changes.items():
            button.click(self._restructure(change), [*state, self.picker, self.identical, self.editor], whole)
        for widget in (self.picker, self.identical):  # the same data, shown again
            widget.input(self._restructure(lambda d, s: (d, s), rewrite=False),
                         [*state, self.picker, self.identical, self.editor], whole)

        self.editor.input(self.from_yaml, [self.editor, self.picker, self.identical],
                          [self.data, *self.form_widgets, *self.message_widgets], **every)
        self.preset.input(lambda name, identical: self.load_text(self.presets[name], identical),
                          [self.preset, self.identical], whole)
        self.upload.upload(lambda file, identical: self.load_text(Path(file).read_text(encoding="utf-8"), identical),
                           [self.upload, self.identical], whole)
        self.editor.change(self.save_download, self.editor, self.download, show_progress="hidden")

        # Each message belongs to the last action: checking clears the last merge's word, merging the last check's.
        self.check.click(lambda: "", None, self.status, queue=False)
        self.check.click(check_models, [self.editor, self.identical], [self.compat, self.estimates, self.check_message])
        self.start.click(lambda: "", None, self.check_message, queue=False)
        self.preview_button.click(self.preview, [self.editor, self.preview_prompts, self.trust],
                                  [self.preview_table, self.preview_figure, self.preview_tokens, self.preview_message])
        # concurrency_limit=None: the runner queues merges itself and says so in the log.
        self.start.click(self.run, [self.editor, self.out_name, self.overwrite, self.trust, self.identical,
                                    self.refine],
                         [self.current, self.progress, self.status, self.log], concurrency_limit=None,
                         show_progress="hidden").then(self.merge_list, None, [self.merges, self.push_merge])
        self.stop.click(lambda job: job.cancel() if job else None, self.current, None)
        self.refresh.click(self.merge_list, None, [self.merges, self.push_merge])
        self.push.click(self.push_merge_to_hub, [self.push_merge, self.repo, self.token, self.private],
                        self.push_message)

    def on_load(self) -> dict:
        """What the page shows when it opens: the initial config in the form, and the finished merges."""
        data = self.data.value
        return {**self.form_values(data, 0), **self.message_values(data, 0, False),
                self.download: self.save_download(self.initial_text),
                **dict(zip([self.merges, self.push_merge], self.merge_list()))}

    @property
    def load_outputs(self) -> list:
        return [*self.form_widgets, *self.message_widgets, self.download, self.merges, self.push_merge]
