"""Router scores of a loaded MoE model: for every token and layer, the softmax over experts."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml


def load_moe(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Model and tokenizer of a merged (or any Hub) MoE, on CPU, for analysis."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def expert_labels(path: str | Path, count: int) -> list[str]:
    """Source-model names from the merge's mergekit_moe_config.yml, else "expert 0", "expert 1", ..."""
    config_file = Path(path) / "mergekit_moe_config.yml"
    if config_file.exists():
        experts = (yaml.safe_load(config_file.read_text()) or {}).get("experts") or []
        names = [str(e.get("source_model")) for e in experts]
        if len(names) == count:
            return names
    return [f"expert {i}" for i in range(count)]


def num_experts(model) -> int:
    config = model.config
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    raise ValueError(f"{type(model).__name__} is not a Mixture-of-Experts model (no expert count in its config)")


@torch.inference_mode()
def router_probabilities(model, input_ids: list[int]) -> torch.Tensor:
    """(layers, tokens, experts): softmax of each MoE layer's router logits for one sequence."""
    out = model(input_ids=torch.tensor([input_ids]), output_router_logits=True, use_cache=False)
    logits = [layer for layer in out.router_logits if layer is not None]
    return torch.stack([layer.float().softmax(dim=-1) for layer in logits]).reshape(len(logits), len(input_ids), -1)
