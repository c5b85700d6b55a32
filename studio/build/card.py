"""The model card (README.md) written next to a merged model."""

from __future__ import annotations

from typing import TYPE_CHECKING

import yaml

from studio.config import dump_yaml
from studio.gate_modes import gate_mode

if TYPE_CHECKING:
    from studio.build.plan import MergePlan


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", "\\n")


def model_card(plan: "MergePlan") -> str:
    config = plan.config
    hub_models = [ref for ref, is_local in ((r.ref, r.local) for r in plan.rows) if not is_local]
    front = {"library_name": "transformers", "tags": ["moe", "frankenmoe", "merge", "moe-merge-studio"]}
    if hub_models:
        front["base_model"] = list(dict.fromkeys(hub_models))
    experts = [(str(i), e) for i, e in enumerate(config.experts)] + [("shared", e) for e in config.shared_experts or []]
    rows = "\n".join(
        f"| {i} | {_cell(e.source_model)} | {'<br>'.join(_cell(p) for p in e.positive_prompts or []) or '-'} "
        f"| {'<br>'.join(_cell(p) for p in e.negative_prompts or []) or '-'} |"
        for i, e in experts)
    n = len(config.experts)
    shared = " A shared expert serves every token." if config.shared_experts else ""
    # Outputs with their own model classes ship them beside the weights.
    remote = ", trust_remote_code=True" if plan.output.code_files else ""
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# {n}-expert {plan.output.name} MoE

A Mixture of Experts built from {n} fine-tunes of `{config.base_model}` with MoE Merge Studio. Attention,
embeddings and norms come from the base model; each expert's MLP comes from one fine-tune; the routers
were built with the `{config.gate_mode}` gate mode and pick {config.experts_per_token} of {n} experts per token.{shared}
Total parameters: {plan.parameters / 1e9:.2f} B.

## Experts

| # | source model | positive prompts | negative prompts |
|---|---|---|---|
{rows}

## Configuration

```yaml
{dump_yaml(config).strip()}
```

## Usage

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model_id = "path/or/hub-id/of/this/model"
tokenizer = AutoTokenizer.from_pretrained(model_id)
model = AutoModelForCausalLM.from_pretrained(model_id, dtype="auto", device_map="auto"{remote})
messages = [{{"role": "user", "content": "Write a Python function that reverses a string."}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True,
                                       return_tensors="pt").to(model.device)
output = model.generate(**inputs, max_new_tokens=256)
print(tokenizer.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

{_router_origin(config.gate_mode)} Fine-tune the model for best results.
"""


def _router_origin(mode_name: str) -> str:
    """How the routers were made, in a sentence, from the gate mode's facts."""
    mode = gate_mode(mode_name)
    if mode.refines:
        return ("The routers were fitted on text the experts wrote from the prompts above and then, when the merged "
                "model fit the merge's device, trained end to end for a few steps (the merge log says which); no "
                "other weight was trained.")
    if not mode.needs_prompts:
        return "The routers are random: the model routes nothing useful until it is trained."
    return "The routers are not trained: they come from the prompts above."


def quality_section(rows: list[list[str]], headers: list[str]) -> str:
    """A section for the card: the held-out loss of base, experts and MoE per domain (studio.inspect.quality's rows)."""
    lines = [headers, ["---"] * len(headers), *rows]
    table = "\n".join("| " + " | ".join(_cell(c) for c in row) + " |" for row in lines)
    return ("\n## Quality on held-out text\n\nMean next-token loss (nats per token, lower is better) of the dense "
            "base, each expert alone and this MoE on held-out text of each expert's domain, and the share of the "
            "expert's gain over the base that the MoE recovers:\n\n" + table + "\n")
