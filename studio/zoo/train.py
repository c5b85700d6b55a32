"""Train the zoo: a small Mistral-architecture base on all four domains, then one expert per domain.

Each expert starts from the base and fine-tunes only its MLPs on its domain (attention, embeddings and norms
stay the base's), which is the situation an MoE merge assumes: every expert lives in the base's residual
space. Deterministic for a given Python (the code corpus is its standard library) and CPU-only.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from studio.build.synthetic import save_tokenizer, train_bpe_tokenizer
from studio.zoo.corpora import DOMAINS, EVAL_CHARS, corpus, encode, held_out_text_ids

ZOO_DIR = Path(__file__).resolve().parents[2] / "assets" / "zoo"
CHAT_TOKENS = ("<|user|>", "<|assistant|>", "<|system|>")
ZOO_ANSWER_TOKENS = 32  # new tokens per chat answer by default (generation_config.json)


@dataclass(frozen=True)
class Recipe:
    """Everything that decides the zoo's weights."""

    hidden: int = 192
    intermediate: int = 512
    layers: int = 4
    heads: int = 6
    kv_heads: int = 2
    vocab: int = 2048
    seq: int = 128
    batch: int = 16
    train_chars: int = 1_200_000
    eval_chars: int = EVAL_CHARS
    base_steps: int = 600
    expert_steps: int = 600
    base_lr: float = 3e-3
    expert_lr: float = 3e-3
    replay_rows: int = 4  # of each expert batch, from the base's four-domain mix; the rest is the expert's domain
    seed: int = 0


def train_tokenizer(texts: list[str], vocab: int):
    return train_bpe_tokenizer(texts, vocab, extra_special_tokens=CHAT_TOKENS)


def held_out_ids(tokenizer, recipe: Recipe = Recipe()) -> dict[str, torch.Tensor]:
    """Each domain's held-out text, encoded: what the loss table is measured on."""
    return held_out_text_ids(tokenizer, recipe.eval_chars, recipe.seed + 1)


def make_model(recipe: Recipe, tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(
        hidden_size=recipe.hidden, intermediate_size=recipe.intermediate, num_hidden_layers=recipe.layers,
        num_attention_heads=recipe.heads, num_key_value_heads=recipe.kv_heads, vocab_size=len(tokenizer),
        max_position_embeddings=4 * recipe.seq, tie_word_embeddings=True, sliding_window=None,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return MistralForCausalLM(config)


def windows(data: list[torch.Tensor], recipe: Recipe, generator: torch.Generator) -> torch.Tensor:
    """A batch of random windows of `seq` tokens, the domains taking turns row by row."""
    rows = []
    for i in range(recipe.batch):
        ids = data[i % len(data)]
        start = int(torch.randint(0, len(ids) - recipe.seq, (1,), generator=generator))
        rows.append(ids[start:start + recipe.seq])
    return torch.stack(rows)


def expert_data(domain: str, data: dict[str, torch.Tensor], recipe: Recipe) -> list[torch.Tensor]:
    """Row sources for an expert's batches: its own domain, plus `replay_rows` rows of the base's mix.

    Like a real fine-tune, the expert keeps what the base knew of the other domains. One that forgot them would
    spoil every token a router sends it as second choice: after a `def` header, a stories expert picked second
    for the word `not` would turn the code into a story.
    """
    mix = [data[DOMAINS[i % len(DOMAINS)]] for i in range(recipe.replay_rows)]
    return [data[domain]] * (recipe.batch - recipe.replay_rows) + mix


def train(model, data: list[torch.Tensor], steps: int, lr: float, recipe: Recipe, only_mlp: bool,
          log: Callable[[str], None]) -> None:
    generator = torch.Generator().manual_seed(recipe.seed + steps + len(data))
    params = [p for n, p in model.named_parameters() if ".mlp." in n or not only_mlp]
    for name, p in model.named_parameters():
        p.requires_grad_(".mlp." in name or not only_mlp)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    model.train()
    for step in range(steps):
        warm = min(1.0, (step + 1) / 50)
        for group in optimizer.param_groups:
            group["lr"] = lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))
        batch = windows(data, recipe, generator)
        loss = model(input_ids=batch, labels=batch).loss  # the model shifts labels itself
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            log(f"  step {step:4d}/{steps}  loss {loss.item():.3f}")
    model.eval()


def held_out_loss(model, ids: torch.Tensor, seq: int = 128) -> float:
    """Mean next-token loss over consecutive windows of held-out text."""
    from studio.inspect.quality import mean_loss

    return mean_loss(model, ids, seq)


def build_zoo(out: Path = ZOO_DIR, recipe: Recipe = Recipe(), log: Callable[[str], None] = print) -> dict:
    """Train and save base + experts under `out`; returns held-out losses {model: {domain: loss}}."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(recipe.seed)
    started = time.time()
    texts = {d: corpus(d, recipe.train_chars, recipe.seed) for d in DOMAINS}
    tokenizer = train_tokenizer(list(texts.values()), recipe.vocab)
    data = {d: encode(tokenizer, t) for d, t in texts.items()}
    evals = held_out_ids(tokenizer, recipe)
    log(f"Tokenised {sum(len(v) for v in data.values())} training tokens in {time.time() - started:.0f} s")

    base = make_model(recipe, tokenizer)
    log(f"Base: {sum(p.numel() for p in base.parameters()) / 1e6:.2f} M parameters, all domains")
    train(base, list(data.values()), recipe.base_steps, recipe.base_lr, recipe, only_mlp=False, log=log)
    models = {"base": base}
    for domain in DOMAINS:
        log(f"Expert {domain}: MLPs fine-tuned on {domain}, {recipe.replay_rows} of {recipe.batch} rows from the mix")
        expert = copy.deepcopy(base)
        train(expert, expert_data(domain, data, recipe), recipe.expert_steps, recipe.expert_lr, recipe,
              only_mlp=True, log=log)
        models[domain] = expert

    losses = {}
    for name, model in models.items():
        folder = out / name
        # The zoo's models are small: greedy and short answers read best (chats take these as their defaults).
        model.generation_config.update(do_sample=False, max_new_tokens=ZOO_ANSWER_TOKENS)
        model.to(torch.bfloat16).save_pretrained(folder)
        save_tokenizer(tokenizer, folder)
        saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        losses[name] = {d: held_out_loss(saved, evals[d], recipe.seq) for d in DOMAINS}
    log(f"Trained the zoo in {time.time() - started:.0f} s")
    return losses


def loss_table(losses: dict[str, dict[str, float]]) -> str:
    """Markdown: held-out loss per domain (columns) for each model (rows); the best in each column in bold."""
    best = {d: min(row[d] for row in losses.values()) for d in DOMAINS}
    lines = ["| model | " + " | ".join(DOMAINS) + " |", "|---" * (len(DOMAINS) + 1) + "|"]
    for name, row in losses.items():
        cells = [f"**{row[d]:.3f}**" if row[d] == best[d] else f"{row[d]:.3f}" for d in DOMAINS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
