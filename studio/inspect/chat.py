"""Chat with an MoE model (a merge, or any MoE on the Hub), streaming its answer and recording its routing.

`load_chat_model` opens a local folder or Hub id at a precision (4-bit NF4 by default, experts included);
`ChatModel.stream` yields the answer's text as it is generated, then the RouterTrace of prompt and answer.
Nothing here knows about a UI: the studio's tabs and the terminal chat both call these functions.
"""

from __future__ import annotations

import json
import threading
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from jinja2 import TemplateError

from studio.errors import StudioError
from studio.formatting import human_bytes
from studio.inspect.moe_folder import open_moe_folder
from studio.inspect.quantize import footprint, load_model, precision_named
from studio.inspect.routing import RouterCapture, find_routers, route_sequence, router_labels
from studio.inspect.settings import ChatSettings
from studio.moe_layouts import expert_count
from studio.prompts import prompt_ids, token_texts
from studio.sources import ModelRef, ModelSource
from studio.trace import RouterTrace

# For tokenizers without a chat template: plain "Role: text" turns, and the next "User:" turn ends an answer.
FALLBACK_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n"
                     "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}")
FALLBACK_STOP = ("\nUser:",)
# Files a chat needs beyond a merge's (sources.download fetches weights, JSON and tokenizer files).
HUB_EXTRAS = ["mergekit_moe_config.yml"]
HUB_REMOTE_CODE = ["*.py"]
LIVE_TRACE_EVERY = 4  # while streaming, a router trace of the text so far every this many tokens

Messages = list[dict]


def generation_defaults(folder: Path) -> tuple[ChatSettings, str]:
    """The settings a model's authors chose in its generation_config.json (ChatSettings' own where it has none),
    and where they come from, in words."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return ChatSettings(), "the studio's defaults (the model has no generation_config.json)"
    try:
        given = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StudioError(f"{path} cannot be read ({exc}); fix or delete it.") from exc
    studio = ChatSettings()
    sampling = bool(given.get("do_sample", False))  # transformers' own default is greedy
    settings = ChatSettings(
        temperature=float(given.get("temperature") or studio.temperature) if sampling else 0.0,
        top_p=float(given.get("top_p") or studio.top_p), top_k=int(given.get("top_k") or 0) if sampling else 0,
        max_new_tokens=int(given.get("max_new_tokens") or studio.max_new_tokens),
        repetition_penalty=float(given.get("repetition_penalty") or 1.0))
    return settings, "the model's generation_config.json"


@dataclass
class Reply:
    text: str
    new_tokens: int
    trace: RouterTrace | None = None


@dataclass
class ChatModel:
    """A loaded MoE and its tokenizer, ready to chat. `footprint` is the model's bytes in memory."""

    model: torch.nn.Module
    tokenizer: object
    name: str
    precision: str
    labels: list[str]
    footprint: int
    stop: tuple[str, ...] = ()  # ends every answer (the fallback template's next turn)
    defaults: ChatSettings = ChatSettings()  # from the model's generation_config.json
    defaults_from: str = "the studio's defaults"

    def describe(self) -> str:
        return (f"{self.name}: {human_bytes(self.footprint)} in memory at {self.precision}, "
                f"{len(self.labels)} experts ({', '.join(self.labels)})")

    def moe_layers(self) -> list[int]:
        """The decoder layers that route (each trace has one row per such layer)."""
        return sorted(find_routers(self.model))

    def encode(self, prompt: Messages | str, system_prompt: str = "") -> list[int]:
        """Token ids of a conversation (through the chat template), or of raw text (BOS + text, as is)."""
        if isinstance(prompt, str):
            return prompt_ids(self.tokenizer, prompt)
        messages = [{"role": m["role"], "content": _text(m["content"])} for m in prompt]
        if system_prompt and (not messages or messages[0]["role"] != "system"):
            messages.insert(0, {"role": "system", "content": system_prompt})
        try:
            return self._apply_template(messages)
        except TemplateError as exc:  # raised by templates without a system role, such as Mistral's
            if messages[0]["role"] != "system" or len(messages) < 2:
                raise StudioError(f"The chat template of {self.name} rejected the conversation: {exc}") from exc
            system, first, *rest = messages
            return self._apply_template([{**first, "content": f"{system['content']}\n\n{first['content']}"}, *rest])

    def _apply_template(self, messages: Messages) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)
        return list(encoded["input_ids"])

    def route(self, text: str) -> RouterTrace:
        """The routing of a text's own tokens (BOS + text, no template), generating nothing."""
        ids = self.encode(text)
        return route_sequence(self.model, ids, self.labels, token_texts(self.tokenizer, ids))

    def reply(self, prompt: Messages | str, settings: ChatSettings = ChatSettings(), capture: bool = True) -> Reply:
        """The whole answer at once."""
        ids = self.encode(prompt, settings.system_prompt)
        new, trace = self._generate(ids, settings, capture)
        text = cut_at_stop(self.tokenizer.decode(new, skip_special_tokens=True), self._stops(settings))
        return Reply(text, len(new), trace)

    def stream(self, prompt: Messages | str, settings: ChatSettings = ChatSettings(), capture: bool = True,
               cancel: threading.Event | None = None, live_every: int = 0) -> Iterator[str | RouterTrace]:
        """The answer's text in pieces as it is generated; then, with `capture`, the RouterTrace of it all.

        Generation runs on a thread; setting `cancel` (or closing the generator early) stops it at the next token,
        and the text and trace so far still come. With `capture` and `live_every`, a RouterTrace of the text so far
        also comes every `live_every` tokens, so that a page can show the routing while the answer grows.
        """
        from transformers import TextIteratorStreamer

        ids = self.encode(prompt, settings.system_prompt)
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        closed = threading.Event()  # the consumer went away
        result: dict = {}
        live = _LiveTrace(self, len(ids), live_every, streamer.text_queue.put) if capture and live_every else None

        def run() -> None:
            try:
                result["trace"] = self._generate(ids, settings, capture, streamer, (closed, cancel), live)[1]
            except BaseException as exc:  # handed to the caller's thread below
                result["error"] = exc
                streamer.end()

        thread = threading.Thread(target=run, name="studio-chat", daemon=True)
        thread.start()
        stop = StopFilter(self._stops(settings))
        try:
            for piece in streamer:
                if isinstance(piece, RouterTrace):
                    yield piece
                elif text := stop.feed(piece):
                    yield text
            thread.join()
        finally:
            closed.set()
        if "error" in result:
            raise result["error"]
        if text := stop.finish():
            yield text
        if capture:
            yield result["trace"]

    def _stops(self, settings: ChatSettings) -> tuple[str, ...]:
        return tuple(settings.stop) + self.stop

    @torch.inference_mode()
    def _generate(self, ids: list[int], settings: ChatSettings, capture: bool, streamer=None,
                  cancel: tuple[threading.Event | None, ...] = (),
                  live: "_LiveTrace | None" = None) -> tuple[list[int], RouterTrace | None]:
        from transformers import StoppingCriteriaList

        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        device = self.model.get_input_embeddings().weight.device
        inputs = torch.tensor([ids], device=device)
        kwargs = self._generation_kwargs(settings)
        with RouterCapture(self.model) if capture else nullcontext() as recorder:
            criteria = [_Cancelled(cancel)] + ([live.watching(recorder)] if live else [])
            out = self.model.generate(inputs, attention_mask=torch.ones_like(inputs), streamer=streamer,
                                      stopping_criteria=StoppingCriteriaList(criteria),
                                      return_dict_in_generate=True, **kwargs)
            sequence = out.sequences[0].tolist()
            if recorder is not None:
                # The last token was generated but never fed back: one more step routes it too.
                self.model(input_ids=out.sequences[:, -1:], past_key_values=out.past_key_values, use_cache=True)
        new = sequence[len(ids):]
        if recorder is None:
            return new, None
        return new, recorder.trace(sequence, token_texts(self.tokenizer, sequence), len(ids), self.labels)

    def _generation_kwargs(self, settings: ChatSettings) -> dict:
        tokenizer = self.tokenizer
        kwargs = {"max_new_tokens": settings.max_new_tokens, "repetition_penalty": settings.repetition_penalty,
                  "do_sample": settings.temperature > 0,
                  "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                  else tokenizer.eos_token_id}
        if settings.temperature > 0:
            kwargs.update(temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k)
        stops = self._stops(settings)
        if stops:
            kwargs.update(stop_strings=list(stops), tokenizer=tokenizer)
        return kwargs


class _Cancelled:
    """Stops generation once any of the events is set: the consumer of a stream went away, or asked to stop."""

    def __init__(self, events: tuple[threading.Event | None, ...]):
        self.events = [event for event in events if event is not None]

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        return any(event.is_set() for event in self.events)


class _LiveTrace:
    """A stopping criterion that never stops: every `every` new tokens it hands `publish` the trace of the
    tokens the routers have seen so far (all but the newest, which is routed at the next step)."""

    def __init__(self, chat: ChatModel, prompt_length: int, every: int, publish) -> None:
        self.chat, self.prompt_length, self.every, self.publish = chat, prompt_length, every, publish
        self.recorder: RouterCapture | None = None

    def watching(self, recorder: RouterCapture) -> "_LiveTrace":
        self.recorder = recorder
        return self

    def __call__(self, input_ids, scores, **kwargs) -> bool:
        seen = input_ids.shape[1] - 1  # copied to the host only when a trace is due
        if (seen - self.prompt_length) % self.every == 0 and seen > self.prompt_length:
            routed = input_ids[0, :-1].tolist()
            tokens = token_texts(self.chat.tokenizer, routed)
            self.publish(self.recorder.trace(routed, tokens, self.prompt_length, self.chat.labels))
        return False


def load_chat_model(model: str | Path, precision: str = "4bit", device: str = "auto",
                    trust_remote_code: bool = False, tqdm_class: type | None = None) -> ChatModel:
    """Open a local MoE folder or Hub id for chat. precision: 4bit (NF4, experts too), 8bit, bf16 or fp32;
    device: auto (every GPU, then the CPU), cpu or cuda. Remote model code runs only with `trust_remote_code`.
    `tqdm_class` shows the progress of a Hub download."""
    from transformers import AutoConfig

    chosen = precision_named(precision)
    source = _open(str(model), trust_remote_code, tqdm_class)
    try:
        config = AutoConfig.from_pretrained(source.folder, trust_remote_code=trust_remote_code)
    except ValueError as exc:  # unknown model type: remote code that was not allowed, or a newer transformers
        raise StudioError(f"Model {model}: transformers cannot build it ({exc}). If it ships its own code and you "
                          f"trust it, pass trust_remote_code (--trust-remote-code).") from None
    expert_count(config)  # a named error for a model without experts, before anything is loaded
    tokenizer = _tokenizer(source, trust_remote_code)
    try:
        loaded = load_model(source, config, chosen, device, trust_remote_code)
    except (RuntimeError, OSError, ValueError) as exc:  # transformers' own report of weights that do not fit
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise StudioError(f"Model {model}: transformers cannot load its weights with its config.json ({first}). "
                          f"The config does not match the weights, or a file is damaged; download the model "
                          f"again.") from exc
    stop = () if tokenizer.chat_template else FALLBACK_STOP
    if not tokenizer.chat_template:
        tokenizer.chat_template = FALLBACK_TEMPLATE
    defaults, defaults_from = generation_defaults(source.folder)
    return ChatModel(loaded, tokenizer, source.label, chosen.name, router_labels(source.folder, config),
                     footprint(loaded), stop, defaults, defaults_from)


def _open(model: str, trust_remote_code: bool, tqdm_class: type | None) -> ModelSource:
    """The model's folder: local, or downloaded from the Hub with its merge config (and code, when trusted)."""
    source = open_moe_folder(model, tqdm_class=tqdm_class)
    ref = ModelRef.parse(model)
    if not ref.is_local:
        from huggingface_hub import snapshot_download

        from studio.sources import hub_error

        patterns = HUB_EXTRAS + (HUB_REMOTE_CODE if trust_remote_code else [])
        try:
            snapshot_download(ref.location, revision=ref.revision, allow_patterns=patterns)
        except Exception as exc:  # huggingface_hub raises many types; each becomes one readable message
            raise hub_error(ref, exc) from exc
    return source


def _tokenizer(source: ModelSource, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise StudioError(f"Model {source.label}: its tokenizer cannot be loaded from {source.folder} "
                          f"({type(exc).__name__}: {str(exc)[:200]}). Chat needs the model's tokenizer files.") from exc


def _text(content) -> str:
    """Message content as text; UIs send a list of parts ([{"type": "text", "text": ...}])."""
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict))




def cut_at_stop(text: str, stops: tuple[str, ...]) -> str:
    """The text before the first stop string."""
    ends = [text.find(stop) for stop in stops if stop and stop in text]
    return text[:min(ends)] if ends else text


class StopFilter:
    """Streamed text up to the first stop string: holds back any tail that could begin one."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + piece
        cut = cut_at_stop(text, tuple(self.stops))
        if cut != text:
            self.stopped, self.pending = True, ""
            return cut
        keep = max((n for stop in self.stops for n in range(1, len(stop)) if text.endswith(stop[:n])), default=0)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self) -> str:
        tail, self.pending = ("" if self.stopped else self.pending), ""
        return tail
