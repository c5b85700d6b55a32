"""Which expert each layer would choose for a test prompt, before anything is merged.

The gates are computed as the merge computes them, rounded to the dtype the merge writes them in, and the
merged model is run from the source checkpoints one layer at a time (StreamedMoE): attention from the base,
each expert's MLP from its source, routed as the merged Mixtral routes. The result is the RouterTrace that
the merged model would record for the same tokens, so a user can fix the prompts before waiting for a merge.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from studio.build.gates import compute_gates, streamed_moe
from studio.build.merge import MergeOptions, prepare
from studio.config import MAX_PROMPT_CHARS, MoEConfig
from studio.errors import StudioError
from studio.prompts import load_tokenizer, prompt_encoder, token_texts
from studio.trace import RouterTrace


def preview_routing(config: MoEConfig, prompts: list[str], options: MergeOptions | None = None,
                    log: Callable[[str], None] = print) -> list[RouterTrace]:
    """One trace per prompt, each prompt encoded as the gate prompts are (`prompt_format`)."""
    options = options or MergeOptions()
    for i, prompt in enumerate(prompts):
        if len(prompt) > MAX_PROMPT_CHARS:  # the pass holds a square of the prompt's length
            raise StudioError(f"Test prompt {i + 1} is {len(prompt):,} characters long; a prompt is at most "
                              f"{MAX_PROMPT_CHARS:,} here. Use a shorter one.")
    plan = prepare(config, options, log)[0]
    gates = compute_gates(plan, options.gate_options(), log)
    router_dtype = next(job.dtype for job in plan.jobs if job.router_layer is not None)
    routers = gates.to(router_dtype).float()
    routed = len(config.experts)  # rows after these are the shared expert's gate (Qwen2-MoE), when it has one
    shared_gates = routers[:, routed] if routers.shape[1] > routed else None
    tokenizer = load_tokenizer(plan.base, options.trust_remote_code)
    encode = prompt_encoder(tokenizer, config.prompt_format, plan.base.label)
    moe = streamed_moe(plan, options.device)
    encoded = [encode(prompt) for prompt in prompts]
    batches = [moe.start(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)) for ids in encoded]
    decisions = moe.run(batches, lambda layer, inputs: routers[layer, :routed], shared_gates=shared_gates)
    labels = [expert.source_model for expert in config.experts]
    return [RouterTrace(tokens=token_texts(tokenizer, ids), token_ids=ids, prompt_length=len(ids), labels=labels,
                        layers=list(range(len(decisions))),
                        probabilities=torch.stack([layer[i].probabilities[0] for layer in decisions]).float().cpu(),
                        experts=torch.stack([layer[i].experts[0] for layer in decisions]).cpu(),
                        weights=torch.stack([layer[i].weights[0] for layer in decisions]).float().cpu())
            for i, ids in enumerate(encoded)]


def summary_rows(prompts: list[str], traces: list[RouterTrace]) -> list[list[str]]:
    """Per prompt: the prompt, then per layer the expert most of its tokens would go to first, and their share."""
    return [[prompt.replace("\n", "⏎")] + [f"{Path(trace.labels[e]).name} {share:.0%}"
                                            for e, share in trace.dominant("prompt")]
            for prompt, trace in zip(prompts, traces)]
