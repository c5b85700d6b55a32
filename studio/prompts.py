"""Text and token ids, for the gate modes, chat and the inspector alike: the base's tokenizer, how prompts become
ids (mergekit's BOS + raw text, or a user turn of the chat template), and each token's own text."""

from __future__ import annotations

from typing import Callable

from studio.errors import StudioError
from studio.sources import ModelSource

TOKEN_CONTEXT = 4  # tokens decoded before each one, so that its own text is the difference


def load_tokenizer(base: ModelSource, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(base.folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a missing or broken tokenizer
        raise StudioError(f"base_model ({base.label}): its tokenizer cannot be loaded from {base.folder} "
                          f"({type(exc).__name__}: {str(exc)[:200]}). Prompt-based gate modes need it; add the "
                          f"tokenizer files, or use `gate_mode: random`.") from exc


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """mergekit's prompt encoding: the BOS string, then the text, with no other special tokens."""
    return tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False)["input_ids"]


def prompt_encoder(tokenizer, prompt_format: str, label: str) -> Callable[[str], list[int]]:
    """How prompts become token ids: mergekit's BOS + raw text, or a user turn of the chat template."""
    if prompt_format == "raw":
        return lambda prompt: prompt_ids(tokenizer, prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise StudioError(f"`prompt_format: chat` needs a chat template, and the tokenizer of base_model ({label}) "
                          f"has none. Use `prompt_format: raw` and write the chat markup into the prompts.")

    def chat(prompt: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    return chat


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    """Each token's own text (special tokens included), as the difference of two short decodes, so that
    byte-level pieces and leading spaces come out as they read in the whole text."""
    texts = []
    for i in range(len(ids)):
        start = max(0, i - TOKEN_CONTEXT)
        before = tokenizer.decode(ids[start:i])
        texts.append(tokenizer.decode(ids[start:i + 1])[len(before):])
    return texts
