"""The Inspect tab: several prompts routed side by side, the routing evaluation, and trace export."""

from __future__ import annotations

import html
import tempfile
from pathlib import Path

import gradio as gr

from studio.app.form import prompts_to_text, text_to_prompts
from studio.app.ui.common import (MODEL_QUEUE, TEST_PROMPTS, ModelPicker, error_text, load_with_progress, loaded_now,
                                  run_reporting)
from studio.app.workspace import expert_prompts
from studio.errors import StudioError
from studio.inspect.evaluate import evaluate_routing, load_prompts
from studio.inspect.loaded import LoadedModel
from studio.inspect.plots import compare_heatmaps, confusion_figure, quality_figure, token_text_html
from studio.inspect.quality import QualityReport, load_texts, measure_quality
from studio.trace import save_traces

ZOO_EVAL = Path(__file__).resolve().parents[3] / "assets" / "zoo" / "eval-prompts.yml"


class InspectTab:
    def __init__(self, loaded: LoadedModel, workspace: Path) -> None:
        self.loaded = loaded
        self.exports = Path(tempfile.mkdtemp(prefix="moe-studio-inspect-"))
        with gr.Column(elem_classes="panel"):
            self.picker = ModelPicker(workspace, "inspect", loaded)
            self.picker.wire_load()
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, elem_classes="panel"):
                self.prompts = gr.Textbox(label="Prompts to compare (a line with only --- between prompts)", lines=8,
                                          value=TEST_PROMPTS,
                                          elem_id="inspect-prompts")
                with gr.Row():
                    self.expert_button = gr.Button("Each expert's positive prompts", elem_id="inspect-expert-prompts")
                    self.compare = gr.Button("Compare", variant="primary", elem_id="inspect-compare-button")
                with gr.Row():
                    self.json = gr.DownloadButton("Traces JSON", elem_id="inspect-json")
                    self.csv = gr.DownloadButton("Traces CSV", elem_id="inspect-csv")
            with gr.Column(scale=5, elem_classes="panel"):
                self.figure = gr.Plot(label="Side by side", elem_id="inspect-compare")
                self.layer = gr.Slider(0, 1, value=0, step=1, interactive=False,  # until prompts are compared
                                       label="MoE layer for the token colouring (compare prompts first)",
                                       elem_id="inspect-layer")
                self.tokens = gr.HTML(elem_id="inspect-tokens")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, elem_classes="panel"):
                gr.Markdown("### Routing evaluation\nHeld-out prompts per expert (YAML: expert name or index -> list "
                            f"of prompts). Without a file: the zoo's `{ZOO_EVAL.name}`.")
                self.eval_file = gr.File(label="Held-out prompts (YAML)", file_types=[".yml", ".yaml"])
                self.evaluate = gr.Button("Evaluate routing", variant="primary", elem_id="inspect-evaluate")
            with gr.Column(scale=5, elem_classes="panel"):
                self.confusion = gr.Plot(label="Confusion matrix", elem_id="inspect-confusion")
                self.table = gr.Code(label="Per layer", language=None, elem_id="inspect-table")
        with gr.Row(equal_height=False):
            with gr.Column(scale=2, elem_classes="panel"):
                gr.Markdown("### Quality: does the MoE keep its experts' gains?\nHeld-out loss of the base, the MoE "
                            "and each expert alone on text of each expert's domain (YAML: expert name or index -> "
                            "list of texts, each a string or `{file: path}`). Without a file: the zoo's own "
                            "held-out text, for merges of the bundled zoo.")
                self.quality_file = gr.File(label="Held-out texts (YAML)", file_types=[".yml", ".yaml"])
                self.measure = gr.Button("Measure quality", variant="primary", elem_id="inspect-quality")
            with gr.Column(scale=5, elem_classes="panel"):
                self.quality_plot = gr.Plot(label="Loss per domain", elem_id="inspect-quality-figure")
                self.quality_table = gr.Dataframe(headers=QualityReport.HEADERS, interactive=False,
                                                  elem_id="inspect-quality-table")
        self.traces = gr.State([])
        self._wire()

    def fill_expert_prompts(self, model: str | None) -> dict:
        status = self.picker.status
        prompts = expert_prompts(model) if model else {}
        if not prompts:
            return {status: "This model has no merge config with positive prompts; type prompts instead."}
        return {self.prompts: prompts_to_text([p for texts in prompts.values() for p in texts]),
                status: f"Filled in the positive prompts of {len(prompts)} experts."}

    def run_compare(self, model: str, precision: str, trust: bool, text: str):
        status = self.picker.status
        try:
            prompts = text_to_prompts(text)
            if not prompts:
                raise StudioError("Type at least one prompt (separate prompts with a line holding only ---).")
            for step in load_with_progress(self.loaded, model, precision, trust):
                if isinstance(step, str):
                    yield {status: step}
            chat, _ = step
            traces = []
            for i, prompt in enumerate(prompts):
                yield {status: f"Routing prompt {i + 1} of {len(prompts)}…"}
                traces.append(chat.route(prompt))
        except Exception as exc:  # shown as a message
            yield {status: error_text(exc)}
            return
        folder = Path(tempfile.mkdtemp(dir=self.exports))  # one per comparison: sessions never share a download
        json_path, csv_path = folder / "router-traces.json", folder / "router-traces.csv"
        save_traces(traces, json_path, csv_path)
        layer = len(traces[0].layers) - 1
        yield {status: f"Compared {len(prompts)} prompts on {chat.name}.",
               self.figure: compare_heatmaps(traces, prompts), self.tokens: self.token_views(traces, layer),
               self.layer: gr.update(minimum=0, maximum=layer, value=layer, interactive=True,
                                     label="MoE layer for the token colouring"), self.traces: traces,
               self.json: str(json_path), self.csv: str(csv_path)}

    @staticmethod
    def token_views(traces: list, position: int) -> str:
        if not traces:
            return ""
        parts = [f"<h4>Prompt {i + 1}</h4>{token_text_html(t, t.layers[min(int(position), len(t.layers) - 1)])}"
                 for i, t in enumerate(traces)]
        return '<div class="token-columns">' + "".join(f"<div>{p}</div>" for p in parts) + "</div>"

    def run_evaluate(self, model: str, precision: str, trust: bool, file):
        """Streams (status, loaded line, confusion figure, table): the previous result is cleared at once, and
        the status counts the prompts routed."""
        cleared = [None, ""]
        try:
            prompts = load_prompts(file or ZOO_EVAL)
            for step in load_with_progress(self.loaded, model, precision, trust):
                if isinstance(step, str):
                    yield step, gr.skip(), *cleared  # (status, loaded line, figure, table)
            chat, _ = step
            total = sum(len(v) for v in prompts.values())

            def evaluate(report):
                return evaluate_routing(chat.model, prompts, chat.tokenizer, chat.labels,
                                        progress=lambda done, of: report(f"Routing held-out prompts: {done} of {of}"))

            for step in run_reporting(evaluate, f"Routing held-out prompts: 0 of {total}"):
                if isinstance(step, str):
                    yield step, loaded_now(self.loaded), *cleared
            report, = step
        except Exception as exc:  # shown as a message
            yield error_text(exc), loaded_now(self.loaded), *cleared
            return
        summary = ", ".join(f"{html.escape(report.labels[k])} {m:.0%}"
                            for k, m in zip(report.intended, report.majority_of_layers))
        yield (f"Prompts routed to their expert in most layers ({total} prompts on {chat.name}): {summary}",
               loaded_now(self.loaded), confusion_figure(report.labels, report.intended, report.confusion),
               report.table())

    def run_quality(self, model: str, precision: str, trust: bool, file):
        del precision  # scored at full precision: the losses compare models, not quantizations
        try:
            if not model:
                raise StudioError("Pick a merged model first.")
            texts = load_texts(file) if file else "zoo"
            yield "Scoring the MoE, its base and each expert on held-out text…", None, None  # the last result goes
            report = measure_quality(model, texts, trust_remote_code=trust, log=lambda m: None)
        except Exception as exc:  # shown as a message
            yield error_text(exc), None, None
            return
        summary = ", ".join(f"{Path(d.expert).name} {d.recovered:.0%}" for d in report.domains)
        yield f"Share of each expert's gain the MoE keeps: {summary}", quality_figure(report), report.rows()

    def _wire(self) -> None:
        status = self.picker.status
        self.expert_button.click(self.fill_expert_prompts, self.picker.model, [self.prompts, status])
        self.compare.click(self.run_compare, [*self.picker.inputs, self.prompts],
                           [status, self.figure, self.tokens, self.layer, self.traces, self.json, self.csv],
                           show_progress="hidden", **MODEL_QUEUE)
        self.layer.input(self.token_views, [self.traces, self.layer], self.tokens, trigger_mode="always_last",
                         show_progress="hidden")
        self.evaluate.click(self.run_evaluate, [*self.picker.inputs, self.eval_file],
                            [status, self.picker.current, self.confusion, self.table], show_progress="hidden",
                            **MODEL_QUEUE)
        self.measure.click(self.run_quality, [*self.picker.inputs, self.quality_file],
                           [status, self.quality_plot, self.quality_table], show_progress="hidden", **MODEL_QUEUE)
