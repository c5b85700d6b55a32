"""The Chat tab: a streaming chat with a loaded MoE and, beside it, the routing of the last exchange."""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from studio.chat import ChatSettings
from studio.loaded import LoadedModel
from studio.plots import layer_expert_heatmap, token_text_html
from studio.trace import RouterTrace
from studio.ui.common import MODEL_QUEUE, ModelPicker, error_text, load_with_progress, loaded_status


def routing_views(trace: RouterTrace | None, part: str, position: int | None):
    """Heatmap, token colouring and the layer slider for a trace (position: index among the MoE layers)."""
    if trace is None:
        return None, "", gr.update()
    position = len(trace.layers) - 1 if position is None else min(int(position), len(trace.layers) - 1)
    slider = gr.update(minimum=0, maximum=len(trace.layers) - 1, value=position, step=1,
                       label=f"MoE layer for the token colouring (decoder layer {trace.layers[position]})")
    return layer_expert_heatmap(trace, part), token_text_html(trace, trace.layers[position]), slider


class ChatTab:
    def __init__(self, loaded: LoadedModel, workspace: Path) -> None:
        self.loaded = loaded
        self.exports = Path(tempfile.mkdtemp(prefix="moe-studio-trace-"))
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, elem_classes="panel"):
                self.picker = ModelPicker(workspace, "chat", loaded)
                self.chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chatbot")
                with gr.Row():
                    self.message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                              scale=5, elem_id="chat-input")
                    self.send = gr.Button("Send", variant="primary", scale=1, elem_id="chat-send")
                    self.clear = gr.Button("Clear", scale=1, elem_id="chat-clear")
                self.raw = gr.Checkbox(False, label="Continue the text as it is (no chat template): for base models "
                                                    "and the zoo's code, math and stories experts",
                                       elem_id="chat-raw")
                with gr.Accordion("Generation settings", open=False):
                    self.system = gr.Textbox(label="System prompt", lines=2)
                    with gr.Row():
                        self.temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="Temperature (0: greedy)",
                                                     elem_id="chat-temperature")
                        self.top_p = gr.Slider(0.05, 1, value=0.95, step=0.05, label="Top-p")
                        self.top_k = gr.Slider(0, 200, value=50, step=1, label="Top-k (0: off)")
                    with gr.Row():
                        self.max_new = gr.Slider(1, 2048, value=256, step=1, label="Max new tokens",
                                                 elem_id="chat-max-new")
                        self.repetition = gr.Slider(0.5, 2, value=1.0, step=0.05, label="Repetition penalty")
                        self.seed = gr.Number(value=-1, label="Seed (-1: random)", precision=0)
                    self.stop = gr.Textbox(label="Stop strings (one per line)", lines=1)
            with gr.Column(scale=4, elem_classes="panel"):
                gr.Markdown("### Routing of the last exchange")
                self.part = gr.Radio(["answer", "prompt"], value="answer", label="Tokens", elem_id="chat-part")
                self.heatmap = gr.Plot(label="Mean router probability, layer x expert", elem_id="chat-heatmap")
                self.layer = gr.Slider(0, 1, value=0, step=1, label="MoE layer for the token colouring",
                                       elem_id="chat-layer")
                self.tokens = gr.HTML(elem_id="chat-tokens")
                with gr.Row():
                    self.json = gr.DownloadButton("Trace JSON", elem_id="chat-trace-json")
                    self.csv = gr.DownloadButton("Trace CSV", elem_id="chat-trace-csv")
        self.trace = gr.State(None)
        self._wire()

    @property
    def settings_inputs(self) -> list:
        return [self.system, self.temperature, self.top_p, self.top_k, self.max_new, self.repetition, self.seed,
                self.stop]

    @staticmethod
    def settings(system, temperature, top_p, top_k, max_new, repetition, seed, stop) -> ChatSettings:
        stops = tuple(line for line in (stop or "").splitlines() if line)
        return ChatSettings(system or "", float(temperature), float(top_p), int(top_k), int(max_new),
                            float(repetition), stops, None if seed is None or seed < 0 else int(seed))

    def respond(self, message: str, history: list, raw: bool, model: str, precision: str, trust: bool, *rest):
        """Streams (history, status, heatmap, tokens, slider, trace, json, csv) while answering `message`
        (with `raw`, continuing it as plain text; the history is then only shown, not sent)."""
        *settings, part = rest
        keep = [gr.skip()] * 6
        if not (message or "").strip():
            yield history, "Type a message first.", *keep
            return
        history = list(history or []) + [{"role": "user", "content": message}]
        try:
            chosen = self.settings(*settings)
            for step in load_with_progress(self.loaded, model, precision, trust):
                if isinstance(step, str):
                    yield history, step, *keep
            chat, fresh = step
            status = loaded_status(chat, fresh)
            answer = {"role": "assistant", "content": ""}
            trace = None
            prompt = message if raw else [{"role": m["role"], "content": m["content"]} for m in history]
            for piece in chat.stream(prompt, chosen):
                if isinstance(piece, RouterTrace):
                    trace = piece
                    continue
                answer["content"] += piece
                yield history + [answer], status, *keep
        except Exception as exc:  # every failure is shown as a message, never as a traceback
            yield history, error_text(exc), *keep
            return
        json_path, csv_path = self.export(trace)
        yield (history + [answer], f"{status}. Answer: {len(trace.tokens) - trace.prompt_length} tokens.",
               *routing_views(trace, part, None), trace, json_path, csv_path)

    def export(self, trace: RouterTrace) -> tuple[str, str]:
        folder = Path(tempfile.mkdtemp(dir=self.exports))  # one per reply: sessions never share a download
        json_path, csv_path = folder / "router-trace.json", folder / "router-trace.csv"
        trace.save(json_path)
        csv_path.write_text(trace.to_csv(), encoding="utf-8")
        return str(json_path), str(csv_path)

    def _wire(self) -> None:
        inputs = [self.message, self.chatbot, self.raw, *self.picker.inputs, *self.settings_inputs, self.part]
        outputs = [self.chatbot, self.picker.status, self.heatmap, self.tokens, self.layer, self.trace, self.json,
                   self.csv]
        for event in (self.send.click, self.message.submit):
            event(self.respond, inputs, outputs, show_progress="hidden", **MODEL_QUEUE).then(
                lambda: "", None, self.message)
        self.clear.click(lambda: ([], None, "", None), None, [self.chatbot, self.heatmap, self.tokens, self.trace])
        views = [self.heatmap, self.tokens, self.layer]
        self.part.input(routing_views, [self.trace, self.part, self.layer], views, show_progress="hidden")
        self.layer.input(routing_views, [self.trace, self.part, self.layer], views, show_progress="hidden",
                         trigger_mode="always_last")
