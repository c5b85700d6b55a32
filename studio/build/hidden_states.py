"""The base model's hidden states at the prompts, for mergekit's `hidden` gate modes.

Llama-shaped bases are run one layer at a time straight from the checkpoint (studio/build/forward.py); others, and
4/8-bit requests, go through transformers. Batches are bounded and left-padded, and positions follow the attention
mask, so a prompt's vector does not depend on its batch mates.
"""

from __future__ import annotations

import gc
from typing import TYPE_CHECKING, Callable

import torch

from studio.build.forward import StreamedDecoder, why_not_streamable
from studio.devices import check_device, resolve_device
from studio.families import Family
from studio.prompts import prompt_ids
from studio.sources import ModelSource

if TYPE_CHECKING:  # gates.py calls this module; the types only are needed here
    from studio.build.gates import GateOptions, GateProgress


def load_base_model(base: ModelSource, options: GateOptions):
    """The base model for the hidden-state pass, quantized when asked."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    check_device(options.device)
    quantization = None
    if options.load_in_4bit:
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_compute_dtype=torch.bfloat16)
    elif options.load_in_8bit:
        quantization = BitsAndBytesConfig(load_in_8bit=True)
    kwargs = {"quantization_config": quantization} if quantization else {}
    model = AutoModelForCausalLM.from_pretrained(base.folder, dtype=torch.bfloat16, device_map=options.device,
                                                 trust_remote_code=options.trust_remote_code, **kwargs)
    return model.eval()


@torch.inference_mode()
def hidden_states_of_prompts(base: ModelSource, family: Family, tokenizer, prompts: list[str], options: GateOptions,
                             average: bool = False, log: Callable[[str], None] = print,
                             check: Callable[[], None] = lambda: None,
                             encode: Callable[[str], list[int]] | None = None,
                             progress: GateProgress = lambda phase, done, total, label: None
                             ) -> dict[str, torch.Tensor]:
    """For each prompt, the residual stream entering every layer (layers, hidden), float32 on CPU.

    Taken at the last token, or averaged over the prompt's tokens when `average`. Llama-shaped bases are run
    one layer at a time straight from the checkpoint; others, and 4/8-bit requests, go through transformers.
    """
    encode = encode or (lambda prompt: prompt_ids(tokenizer, prompt))
    encoded = {p: encode(p) for p in prompts}
    batches = list(padded_batches(encoded, options.batch_size, pad_id(tokenizer)))
    longest = max((len(ids) for ids in encoded.values()), default=0)
    quantized = options.load_in_4bit or options.load_in_8bit
    reason = "4/8-bit loading asked for" if quantized else why_not_streamable(base.config, longest)
    if reason is None:
        log(f"Computing hidden states of {len(prompts)} prompts with {base.label}, one layer at a time")
        return _streamed_states(base, family, batches, options.device, average, check, progress)
    log(f"Computing hidden states of {len(prompts)} prompts with {base.label} via transformers ({reason})")
    return _transformers_states(base, batches, options, average, check, progress)


def padded_batches(encoded: dict[str, list[int]], size: int, pad: int):
    """(prompts, ids, mask) batches, left-padded; similar lengths share a batch, so there is little padding."""
    order = sorted(encoded, key=lambda p: len(encoded[p]))
    for start in range(0, len(order), size):
        batch = order[start:start + size]
        width = max(1, max(len(encoded[p]) for p in batch))
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, prompt in enumerate(batch):
            seq = encoded[prompt]
            if seq:
                ids[row, width - len(seq):] = torch.tensor(seq)
                mask[row, width - len(seq):] = 1
        yield batch, ids, mask


def pad_id(tokenizer) -> int:
    return next((t for t in (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
                 if t is not None), 0)


def _reduce(hidden: torch.Tensor, mask: torch.Tensor, average: bool) -> torch.Tensor:
    """(batch, seq, hidden) -> (batch, hidden): the last position (a real token: padding is on the left), or
    the mean over real tokens."""
    if not average:
        return hidden[:, -1].float().cpu()
    weights = mask[..., None].to(hidden.dtype)
    return ((hidden * weights).sum(1) / weights.sum(1).clamp_min(1)).float().cpu()


def _streamed_states(base: ModelSource, family: Family, batches: list, device: str, average: bool,
                     check: Callable[[], None], progress: GateProgress) -> dict[str, torch.Tensor]:
    decoder = StreamedDecoder(base, family, resolve_device(device))
    running = [(prompts, decoder.start(ids, mask)) for prompts, ids, mask in batches]
    per_layer: dict[str, list[torch.Tensor]] = {p: [] for prompts, _ in running for p in prompts}
    layers = base.config["num_hidden_layers"]
    for layer in range(layers):
        check()
        for prompts, batch in running:
            for prompt, vector in zip(prompts, _reduce(batch.hidden, batch.mask, average)):
                per_layer[prompt].append(vector)
        if layer + 1 < layers:  # the last layer's output is never needed
            step = decoder.layer(layer)
            for _, batch in running:
                step(batch)
        progress("hidden", layer + 1, layers, f"Hidden states of the prompts: layer {layer + 1} of {layers}")
    return {p: torch.stack(vectors) for p, vectors in per_layer.items()}


def _transformers_states(base: ModelSource, batches: list, options: GateOptions, average: bool,
                         check: Callable[[], None], progress: GateProgress) -> dict[str, torch.Tensor]:
    model = load_base_model(base, options)
    device = model.get_input_embeddings().weight.device
    states, total = {}, sum(len(prompts) for prompts, _, _ in batches)
    try:
        for prompts, ids, mask in batches:
            check()
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            out = model.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                              position_ids=positions.to(device), output_hidden_states=True, use_cache=False)
            entering = out.hidden_states[:-1]  # index l: the residual stream entering layer l
            vectors = torch.stack([_reduce(h, mask.to(h.device), average) for h in entering], dim=1)
            states.update(zip(prompts, vectors))
            progress("hidden", len(states), total, f"Hidden states of the prompts: {len(states)} of {total}")
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return states
