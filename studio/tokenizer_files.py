"""Tokenizer configs that transformers 4.x and 5.x both read.

transformers 5 saves a tokenizer's unnamed extra special tokens as a list under `extra_special_tokens` and names
its own backend class (`TokenizersBackend`); 4.57 reads `extra_special_tokens` as a dict of named tokens
(`AttributeError: 'list' object has no attribute 'keys'`) and has no such class. Both versions read the older
spelling, `additional_special_tokens` with `PreTrainedTokenizerFast`, to the same tokenizer, so that is what the
studio writes.
"""

from __future__ import annotations

import json
from pathlib import Path

# Backend class names of transformers 5 that 4.x lacks; both read a tokenizer.json through this class.
FAST_CLASS = "PreTrainedTokenizerFast"
V5_ONLY_CLASSES = {"TokenizersBackend"}


def portable_tokenizer_config(config: dict) -> dict:
    """`config` (a tokenizer_config.json's content) in the spelling both 4.x and 5.x read; other keys unchanged."""
    portable = dict(config)
    extra = portable.get("extra_special_tokens")
    if isinstance(extra, list):
        del portable["extra_special_tokens"]
        additional = list(portable.get("additional_special_tokens") or [])
        portable["additional_special_tokens"] = additional + [t for t in extra if t not in additional]
    if portable.get("tokenizer_class") in V5_ONLY_CLASSES:
        portable["tokenizer_class"] = FAST_CLASS
    return portable


def write_portable_tokenizer_config(source: Path, target: Path) -> None:
    """Copy a tokenizer_config.json, byte for byte unless it holds a spelling only transformers 5 reads.

    A file that is not a JSON object is copied as it is: loading the merge reports it as it would the base's.
    """
    data = source.read_bytes()
    try:
        config = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        config = None
    portable = portable_tokenizer_config(config) if isinstance(config, dict) else config
    if portable == config:
        target.write_bytes(data)
    else:
        target.write_text(json.dumps(portable, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
