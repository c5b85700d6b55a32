"""The Chat tab: a streaming chat with a loaded MoE and, beside it, the routing of the last exchange."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import gradio as gr

from studio.app.ui.common import MODEL_QUEUE, ModelPicker, error_text, load_with_progress, loaded_now, loaded_status
from studio.inspect.chat import ChatModel
from studio.inspect.settings import ChatSettings
from studio.inspect.conversation import Conversation
from studio.inspect.loaded import LoadedModel
from studio.inspect.plots import layer_expert_heatmap, token_text_html
from studio.trace import RouterTrace


def layer_slider(layers: list[int], position: int | None = None):
    """The slider over a model's MoE layers (position: index among them; None: the last)."""
    position = len(layers) - 1 if position is None else min(int(position), len(layers) - 1)
    return gr.update(minimum=0, maximum=len(layers) - 1, value=position, step=1, interactive=True,
                     label=f"MoE layer for the token colouring (decoder layer {layers[position]})")


def routing_views(trace: RouterTrace | None, part: str, position: int | None) -> tuple:
    """Heatmap, token colouring and the layer slider for a trace (position: index among the MoE layers)."""
    if trace is None:
        return None, "", gr.update()
    position = len(trace.layers) - 1 if position is None else min(int(position), len(trace.layers) - 1)
    return (layer_expert_heatmap(trace, part), token_text_html(trace, trace.layers[position]),
            layer_slider(trace.layers, position))


class Pace:
    """How often a streaming answer reaches the page: its text at most every `text` seconds, its routing figures
    every `routing` seconds (figures redrawn at every token keep a small machine's browser too busy to type in),
    and always at the end of an answer."""

    def __init__(self, text: float = 0.2, routing: float = 1.0) -> None:
        self.every = {"text": text, "routing": routing}
        self.last = {"text": 0.0, "routing": 0.0}

    def due(self, what: str, final: bool = False) -> bool:
        now = time.monotonic()
        if final or now - self.last[what] >= self.every[what]:
            self.last[what] = now
            return True
        return False


def chat_view(messages: list[dict]) -> list[dict]:
    """Messages for the Chatbot, as text parts: a plain string would have its indentation removed
    (gradio dedents it); the page shows the text as it is."""
    return [{"role": m["role"], "content": [{"type": "text", "text": m["content"]}]} for m in messages]


def settings_note(chat: ChatModel) -> str:
    return (f"Generation settings set to {chat.defaults.describe()}, from {chat.defaults_from}. "
            f"Change them under **Generation settings**.")


class ChatTab:
    def __init__(self, loaded: LoadedModel, workspace: Path) -> None:
        self.loaded = loaded
        self.exports = Path(tempfile.mkdtemp(prefix="moe-studio-trace-"))
        with gr.Row(equal_height=False):
            with gr.Column(scale=5, elem_classes="panel"):
                self.picker = ModelPicker(workspace, "chat", loaded, follow=self.follow_load)
                # Plain text: replies are code, sums and stories, which Markdown would mangle (indentation, __x__).
                self.chatbot = gr.Chatbot(show_label=False, height=480, elem_id="chatbot", render_markdown=False,
                                          buttons=["copy"])
                with gr.Row():
                    self.message = gr.Textbox(placeholder="Type a message and press Enter", show_label=False,
                                              scale=5, elem_id="chat-input")
                    self.send = gr.Button("Send", variant="primary", scale=1, min_width=70, elem_id="chat-send")
                    self.stop = gr.Button("Stop", variant="stop", scale=1, min_width=70, elem_id="chat-stop")
                    self.clear = gr.Button("Clear", scale=1, min_width=70, elem_id="chat-clear")
                self.raw = gr.Checkbox(False, label="Continue the text as it is (no chat template): for base models "
                                                    "and the zoo's code, math and stories experts",
                                       elem_id="chat-raw")
                with gr.Accordion("Generation settings", open=False):
                    self.note = gr.Markdown("Loading a model sets these to its own defaults (its "
                                            "generation_config.json).", elem_id="chat-settings-note")
                    self.system = gr.Textbox(label="System prompt", lines=2)
                    studio = ChatSettings()  # until a model is loaded and brings its own
                    with gr.Row():
                        self.temperature = gr.Slider(0, 2, value=studio.temperature, step=0.05,
                                                     label="Temperature (0: greedy)",
                                                     elem_id="chat-temperature")
                        self.top_p = gr.Slider(0.05, 1, value=studio.top_p, step=0.05, label="Top-p")
                        self.top_k = gr.Slider(0, 200, value=studio.top_k, step=1, label="Top-k (0: off)")
                    with gr.Row():
                        self.max_new = gr.Slider(1, 2048, value=studio.max_new_tokens, step=1, label="Max new tokens",
                                                 elem_id="chat-max-new")
                        self.repetition = gr.Slider(0.5, 2, value=studio.repetition_penalty, step=0.05,
                                                    label="Repetition penalty")
                        self.seed = gr.Number(value=-1, label="Seed (-1: random)", precision=0)
                    self.stops = gr.Textbox(label="Stop strings (one per line)", lines=1)
            with gr.Column(scale=4, elem_classes="panel"):
                gr.Markdown("### Routing of the last exchange")
                self.part = gr.Radio(["answer", "prompt"], value="answer", label="Tokens", elem_id="chat-part")
                self.heatmap = gr.Plot(label="Mean router probability, layer x expert", elem_id="chat-heatmap")
                self.layer = gr.Slider(0, 1, value=0, step=1, interactive=False,  # until a model is loaded
                                       label="MoE layer for the token colouring (load a model first)",
                                       elem_id="chat-layer")
                self.tokens = gr.HTML(elem_id="chat-tokens")
                with gr.Row():
                    self.json = gr.DownloadButton("Trace JSON", elem_id="chat-trace-json")
                    self.csv = gr.DownloadButton("Trace CSV", elem_id="chat-trace-csv")
        self.trace = gr.State(None)
        self.conversation = gr.State(None)  # a Conversation per browser session, made by its first message
        self.picker.followers = [*self.model_views, self.layer]
        self.picker.wire_load()
        self._wire()

    @property
    def settings_inputs(self) -> list:
        return [self.system, self.temperature, self.top_p, self.top_k, self.max_new, self.repetition, self.seed,
                self.stops]

    @property
    def model_views(self) -> list:
        """The settings that follow a model loaded now: its defaults, and where they come from."""
        return [self.temperature, self.top_p, self.top_k, self.max_new, self.repetition, self.note]

    def follow_model(self, chat: ChatModel, fresh: bool) -> dict:
        if not fresh:  # the same model again: the settings are the person's own by now
            return {}
        d = chat.defaults
        return dict(zip(self.model_views, [d.temperature, d.top_p, d.top_k, d.max_new_tokens, d.repetition_penalty,
                                           settings_note(chat)]))

    def follow_load(self, chat: ChatModel, fresh: bool) -> dict:
        return {**self.follow_model(chat, fresh), self.layer: layer_slider(chat.moe_layers())}

    def shown(self, trace: RouterTrace, part: str) -> dict:
        return dict(zip([self.heatmap, self.tokens, self.layer], routing_views(trace, part, None)))

    @staticmethod
    def settings(system, temperature, top_p, top_k, max_new, repetition, seed, stop) -> ChatSettings:
        stops = tuple(line for line in (stop or "").splitlines() if line)
        return ChatSettings(system or "", float(temperature), float(top_p), int(top_k), int(max_new),
                            float(repetition), stops, None if seed is None or seed < 0 else int(seed))

    def submit(self, message: str, raw: bool, conversation: Conversation | None) -> dict:
        """The message joins the conversation's queue (with `raw`, to be continued as plain text), or stays in the
        textbox with a word on why."""
        if not (message or "").strip():
            return {self.picker.status: "Type a message first."}
        conversation = conversation or Conversation()
        note = conversation.submit(message, raw)
        return {self.message: "", self.chatbot: chat_view(conversation.shown()), self.picker.status: note,
                self.conversation: conversation}

    def respond(self, conversation: Conversation | None, model: str, precision: str, trust: bool, *rest):
        """Streams {widget: value} while answering the conversation's queued messages: the chat, the status, the
        routing views, the trace and its files. A model loaded now answers with its own defaults."""
        *settings, part = rest
        if conversation is None or not conversation.waiting:  # answered already by the reply before it
            yield gr.skip()  # (a generator that yields nothing blanks every output)
            return
        try:
            chosen = self.settings(*settings)
            for step in load_with_progress(self.loaded, model, precision, trust):
                if isinstance(step, str):
                    yield {self.picker.status: step}
            chat, fresh = step
            once = {**self.follow_model(chat, fresh), self.layer: layer_slider(chat.moe_layers())}
            if fresh:
                chosen = replace(chat.defaults, system_prompt=chosen.system_prompt, stop=chosen.stop,
                                 seed=chosen.seed)
            status, pace = loaded_status(chat, fresh), Pace()
            for update in conversation.answer_waiting(chat, chosen):
                if not pace.due("text", update.final):
                    continue
                views = dict(once)
                if update.trace is not None:
                    views[self.trace] = update.trace
                    if pace.due("routing", update.final):
                        views.update(self.shown(update.trace, part))
                    if update.final:
                        views.update(zip([self.json, self.csv], self.export(update.trace)))
                yield {self.chatbot: chat_view(update.messages), self.picker.status: f"{status}. {update.status}",
                       self.picker.current: loaded_now(self.loaded), **views}
                once = {}
        except Exception as exc:  # every failure is shown as a message, never as a traceback
            unsent = "\n".join(text for text, _ in conversation.waiting)
            conversation.waiting.clear()  # back into the textbox, to send again
            yield {self.message: unsent or gr.skip(), self.chatbot: chat_view(conversation.shown()),
                   self.picker.status: error_text(exc), self.picker.current: loaded_now(self.loaded)}

    def export(self, trace: RouterTrace) -> tuple[str, str]:
        folder = Path(tempfile.mkdtemp(dir=self.exports))  # one per reply: sessions never share a download
        json_path, csv_path = folder / "router-trace.json", folder / "router-trace.csv"
        trace.save(json_path)
        csv_path.write_text(trace.to_csv(), encoding="utf-8")
        return str(json_path), str(csv_path)

    @staticmethod
    def stop_answer(conversation: Conversation | None) -> None:
        if conversation is not None:
            conversation.stop.set()

    @staticmethod
    def clear_chat(conversation: Conversation | None):
        if conversation is not None:
            conversation.clear()
        return [], None, "", None

    def _wire(self) -> None:
        inputs = [self.conversation, *self.picker.inputs, *self.settings_inputs, self.part]
        outputs = [self.message, self.chatbot, self.picker.status, self.picker.current, self.heatmap, self.tokens,
                   self.layer, self.trace, self.json, self.csv, *self.model_views]
        for event in (self.send.click, self.message.submit):
            event(self.submit, [self.message, self.raw, self.conversation],
                  [self.message, self.chatbot, self.picker.status, self.conversation], queue=False,
                  trigger_mode="multiple").then(
                self.respond, inputs, outputs, show_progress="hidden", trigger_mode="multiple", **MODEL_QUEUE)
        self.stop.click(self.stop_answer, self.conversation, None, queue=False)
        self.clear.click(self.clear_chat, self.conversation, [self.chatbot, self.heatmap, self.tokens, self.trace],
                         queue=False)
        views = [self.heatmap, self.tokens, self.layer]
        self.part.input(routing_views, [self.trace, self.part, self.layer], views, show_progress="hidden")
        self.layer.input(routing_views, [self.trace, self.part, self.layer], views, show_progress="hidden",
                         trigger_mode="always_last")
