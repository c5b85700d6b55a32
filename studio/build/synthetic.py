"""Small dense models made on the spot: a base and its "fine-tunes", for tests and benchmarks.

Real transformers models saved with `save_pretrained`, with a real BPE tokenizer and chat template, so the
merge reads them exactly as it reads models from the Hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from studio.tokenizer_files import portable_tokenizer_config

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CORPUS = [
    "def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n", "class Point:\n    pass\n",
    "12 + 7 = 19", "3 * 4 = 12", "What is 15 minus 6? It is 9.", "Once upon a time there was a small fox.",
    "The king walked into the quiet forest at night.", "Hello, how are you today? I am fine, thank you.",
    "Question: what is the capital of France? Answer: Paris.", "import os\nimport sys\n",
]


def train_bpe_tokenizer(texts: list[str], vocab_size: int, extra_special_tokens: tuple[str, ...] = ()):
    """A byte-level BPE tokenizer with <pad>, <s>, </s> (and any extra special tokens) and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", *extra_special_tokens],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    extra = {"additional_special_tokens": list(extra_special_tokens)} if extra_special_tokens else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   chat_template=CHAT_TEMPLATE, **extra)


def make_tokenizer(vocab_size: int = 384):
    """The small tokenizer of the test and benchmark models."""
    return train_bpe_tokenizer(CORPUS * 4, vocab_size)


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Save so that transformers 4.x reads it too (see studio.tokenizer_files)."""
    tokenizer.save_pretrained(folder)
    config_path = folder / "tokenizer_config.json"
    config = portable_tokenizer_config(json.loads(config_path.read_text()))
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def dense_config(family: str = "mistral", hidden: int = 64, intermediate: int = 128, layers: int = 2,
                 heads: int = 4, kv_heads: int = 2, vocab: int = 384, tie: bool = False, **extra):
    import transformers

    names = {"mistral": "MistralConfig", "llama": "LlamaConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config",
             "phi": "PhiConfig"}
    cls = getattr(transformers, names[family])
    return cls(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
               max_position_embeddings=256, tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2,
               pad_token_id=0, **extra)


def make_family(folder: Path, n_experts: int = 4, family: str = "mistral", dtype: torch.dtype = torch.bfloat16,
                max_shard_size: str | int | None = None, seed: int = 0, tokenizer=None,
                **shape) -> tuple[Path, list[Path]]:
    """A base model and `n_experts` fine-tunes of it (same attention, perturbed MLPs), saved under `folder`."""
    from transformers import AutoModelForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizer or make_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(dense_config(family, **shape)).to(dtype)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    paths = []
    for i in range(n_experts + 1):
        path = folder / ("base" if i == 0 else f"expert{i}")
        generator = torch.Generator().manual_seed(seed * 1000 + i)
        state = {k: (v + 0.05 * torch.randn(v.shape, generator=generator).to(dtype)) if ".mlp." in k and i else v
                 for k, v in base_state.items()}
        model.load_state_dict(state)
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        model.save_pretrained(path, **kwargs)
        save_tokenizer(tokenizer, path)
        paths.append(path)
    return paths[0], paths[1:]
