"""One person's chat with a loaded model: the messages, the ones typed while an answer streams (queued, never
dropped), and a Stop switch that ends the current answer at the next token.

The Chat tab keeps one Conversation per browser session; nothing here knows about a UI.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Iterator

from studio.inspect.chat import LIVE_TRACE_EVERY, ChatModel
from studio.inspect.settings import ChatSettings
from studio.trace import RouterTrace


@dataclass
class Update:
    """What to show after each step of an answer."""

    messages: list[dict]  # the conversation as shown: queued messages at the end
    status: str
    trace: RouterTrace | None = None  # the newest trace: of the text so far while streaming
    final: bool = False  # the trace covers the whole answer


class Conversation:
    def __init__(self) -> None:
        self.messages: list[dict] = []
        self.waiting: deque[tuple[str, bool]] = deque()  # (text, whether it is continued as plain text)
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.answering = False

    def shown(self) -> list[dict]:
        return self.messages + [{"role": "user", "content": text} for text, _ in self.waiting]

    def submit(self, text: str, raw: bool = False) -> str:
        """Queue a message (with `raw`, to be continued as plain text: the earlier messages are then only shown,
        not sent); says whether it is answered now or after the answers before it."""
        with self._lock:
            behind = self.answering or bool(self.waiting)
            self.waiting.append((text, raw))
        if behind:
            return f"Queued: answered when the current reply ends ({len(self.waiting)} waiting). Stop ends it now."
        return "Sent."

    def clear(self) -> None:
        """Forget the conversation; an answer streaming now is stopped."""
        with self._lock:
            self.waiting.clear()
            self.messages = []
        self.stop.set()

    def _next(self) -> tuple[str, bool] | None:
        """The next queued message and its `raw`, or None (and no longer answering) when there is none."""
        with self._lock:
            self.answering = bool(self.waiting)
            return self.waiting.popleft() if self.waiting else None

    def answer_waiting(self, chat: ChatModel, settings: ChatSettings,
                       live_every: int = LIVE_TRACE_EVERY) -> Iterator[Update]:
        """Answer every queued message in turn, including those queued meanwhile, streaming each answer."""
        while (queued := self._next()) is not None:
            text, raw = queued
            self.stop.clear()
            asked = {"role": "user", "content": text}
            prompt = text if raw else [*self.messages, asked]
            answer = {"role": "assistant", "content": ""}
            self.messages = [*self.messages, asked, answer]
            trace = None
            for piece in chat.stream(prompt, settings, cancel=self.stop, live_every=live_every):
                if isinstance(piece, RouterTrace):
                    trace = piece
                else:
                    answer["content"] += piece
                yield Update(self.shown(), self._answering(), trace)
            yield Update(self.shown(), self._summary(trace), trace, final=True)
        self.stop.clear()

    def _answering(self) -> str:
        queued = len(self.waiting)
        after = f" Queued: {queued} message{'s' if queued > 1 else ''}, answered when the current reply ends." \
            if queued else ""
        return f"Answering… (Stop ends the reply.){after}"

    def _summary(self, trace: RouterTrace | None) -> str:
        tokens = len(trace.tokens) - trace.prompt_length if trace else 0
        ended = "Stopped after" if self.stop.is_set() else "Answer:"
        return f"{ended} {tokens} tokens."
