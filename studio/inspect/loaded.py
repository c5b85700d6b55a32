"""The chat model in memory, shared by the Chat and Inspect tabs: asking again for the same model reuses it."""

from __future__ import annotations

import gc
import threading
from pathlib import Path

from studio.inspect.chat import ChatModel, load_chat_model


class LoadedModel:
    """Holds one loaded model. Another model (or precision) replaces it, freeing the old one first, since two
    large models rarely fit side by side."""

    def __init__(self, device: str = "auto") -> None:
        self.device = device
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._model: ChatModel | None = None

    @property
    def current(self) -> ChatModel | None:
        """The model held now, if any."""
        return self._model

    def get(self, model: str, precision: str, trust_remote_code: bool = False,
            tqdm_class: type | None = None) -> tuple[ChatModel, bool]:
        """The model, and whether it was loaded by this call (False: reused)."""
        key = _key(model, precision, trust_remote_code)
        with self._lock:
            if key == self._key and self._model is not None:
                return self._model, False
            self._model, self._key = None, None
            gc.collect()
            self._model = load_chat_model(model.strip(), precision, self.device, trust_remote_code, tqdm_class)
            self._key = key
            return self._model, True


def _key(model: str, precision: str, trust_remote_code: bool) -> tuple:
    """Same model, precision and trust; a local folder counts as new when it was merged again since."""
    path = Path(model.strip()).expanduser()
    if (path / "config.json").is_file():
        return str(path.resolve()), (path / "config.json").stat().st_mtime_ns, precision, trust_remote_code
    return model.strip(), None, precision, trust_remote_code
