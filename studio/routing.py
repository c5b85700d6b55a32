"""Router scores of a loaded MoE model: for every token and layer, the softmax over experts.

Two ways in: `router_probabilities` runs one plain forward with `output_router_logits`; `RouterCapture` hooks
every router while the model generates, for the prompt and each new token, and makes a RouterTrace.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from studio.errors import StudioError
from studio.trace import RouterTrace

EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_top_k", "top_k", "top_k_experts")
ROUTER_NAMES = ("gate", "router")  # what MoE blocks call their router: Mixtral, Qwen-MoE, OLMoE, DeepSeek, gpt-oss
# Routers whose first output is already the softmax over experts, not logits (and so is `out.router_logits`).
PROBABILITY_ROUTERS = ("Gemma4TextRouter",)
ROUTER_NAME = re.compile(rf"layers\.(\d+)\.(?:.+\.)?(?:{'|'.join(ROUTER_NAMES)})$")


def load_moe(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Model and tokenizer of a merged (or any Hub) MoE, on CPU, for analysis. The folder is opened and checked as
    chat opens it (studio.moe_folder), so a broken model gets the same named error in every command."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from studio.moe_folder import open_moe_folder

    source = open_moe_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        raise StudioError(f"Model {path}: its tokenizer cannot be loaded from {source.folder} "
                          f"({type(exc).__name__}: {str(exc)[:200]}).") from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=dtype, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise StudioError(f"Model {path}: transformers cannot load it ({type(exc).__name__}: {str(exc)[:200]}). If it "
                          f"ships its own code and you trust it, pass trust_remote_code (--trust-remote-code).") from exc
    return model.eval(), tokenizer


def expert_labels(path: str | Path, count: int) -> list[str]:
    """Source-model names from the merge's mergekit_moe_config.yml, else "expert 0", "expert 1", ..."""
    from studio import safe_yaml

    config_file = Path(path) / "mergekit_moe_config.yml"
    try:  # the labels only name the experts: a damaged file gives the default ones, not an error
        data = safe_yaml.load(safe_yaml.decode(config_file.read_bytes(), str(config_file)), str(config_file))
        names = [str(e.get("source_model")) for e in data.get("experts") or []]
    except (OSError, StudioError, AttributeError, TypeError):
        names = []
    return names if len(names) == count else [f"expert {i}" for i in range(count)]


def expert_count(config) -> int:
    """Routed experts per MoE layer, from a transformers config."""
    count = _config_value(config, EXPERT_COUNT_KEYS, 0)
    if count:
        return count
    raise StudioError(f"{getattr(config, 'model_type', 'This model')} is not a Mixture-of-Experts model (its config "
                      f"has none of {', '.join(EXPERT_COUNT_KEYS)}). Pick an MoE model, such as a merge.")


def num_experts(model) -> int:
    return expert_count(model.config)


@torch.inference_mode()
def router_probabilities(model, input_ids: list[int]) -> torch.Tensor:
    """(layers, tokens, experts): softmax of each MoE layer's router logits for one sequence."""
    out = model(input_ids=torch.tensor([input_ids]), output_router_logits=True, use_cache=False)
    scores = [layer.float() for layer in out.router_logits if layer is not None]
    normalise = not gives_probabilities(find_routers(model))
    return torch.stack([s.softmax(dim=-1) if normalise else s for s in scores]).reshape(len(scores), len(input_ids), -1)


def gives_probabilities(routers: dict[int, torch.nn.Module]) -> bool:
    """True when the routers return the softmax itself (PROBABILITY_ROUTERS), not logits."""
    return any(type(router).__name__ in PROBABILITY_ROUTERS for router in routers.values())


def find_routers(model) -> dict[int, torch.nn.Module]:
    """Each MoE layer's router, by decoder-layer index: a module called gate or router (ROUTER_NAMES) inside
    `layers.N` with one output per expert. Dense layers, and gates of one output (Qwen2-MoE's shared-expert
    gate), have none."""
    count = num_experts(model)
    routers: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        match = ROUTER_NAME.search(name)
        if match and _outputs(module) == count:
            routers.setdefault(int(match[1]), module)
    if not routers:
        raise StudioError(f"No router found in {type(model).__name__}: no module named "
                          f"{' or '.join(ROUTER_NAMES)} with {count} outputs inside its layers.")
    return dict(sorted(routers.items()))


def _outputs(module: torch.nn.Module) -> int | None:
    """Output width of a router (nn.Linear, a quantized Linear, a module holding an (experts, hidden) weight, or
    one whose projection is its `proj` child, as Gemma 4's)."""
    if getattr(module, "out_features", None):
        return module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0]
    projection = getattr(module, "proj", None)
    return _outputs(projection) if isinstance(projection, torch.nn.Module) else None


class RouterCapture:
    """Forward hooks on every router while active: each call's logits (and the model's own top-k, when the router
    returns it) are kept as they come, and turned into probabilities only when the trace is built, so capture
    adds almost nothing to a generation step.

    A router fires once for the prompt (tokens, experts), then once per generated token (1, experts). Its output
    is a tuple `(logits, top-k weights, top-k experts)` in transformers 5 (the convention of nearly every MoE
    there) and the logits tensor in 4.x.
    """

    def __init__(self, model):
        self.routers = find_routers(model)
        self.experts = num_experts(model)
        self.top_k = _config_value(model.config, TOP_K_KEYS, 2)
        self.renormalize = bool(getattr(model.config, "norm_topk_prob", True))  # Mixtral renormalizes
        self.probabilities_first = gives_probabilities(self.routers)
        self.calls: dict[int, list] = {layer: [] for layer in self.routers}
        self._handles: list = []

    def __enter__(self) -> "RouterCapture":
        self._handles = [router.register_forward_hook(self._recorder(layer)) for layer, router in self.routers.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _recorder(self, layer: int):
        calls = self.calls[layer]

        def record(module, args, output) -> None:
            calls.append(output)

        return record

    def trace(self, token_ids: list[int], tokens: list[str], prompt_length: int, labels: list[str]) -> RouterTrace:
        """The trace of everything the routers saw since the capture began: exactly the tokens `token_ids`."""
        probabilities, experts, weights = [], [], []
        for layer, outputs in self.calls.items():
            calls = [self._logits_first(layer, output) for output in outputs]
            logits = torch.cat([l.reshape(-1, self.experts) for l, _ in calls]).float().cpu()
            if logits.shape[0] != len(token_ids):
                raise StudioError(f"Layer {layer}'s router saw {logits.shape[0]} tokens for a sequence of "
                                  f"{len(token_ids)}; routing is recorded for one sequence at a time.")
            probs = logits if self.probabilities_first else logits.softmax(dim=-1)
            chosen = self._model_choices(calls) or self._top_k(probs)
            probabilities.append(probs)
            weights.append(chosen[0])
            experts.append(chosen[1])
        return RouterTrace(tokens, token_ids, prompt_length, labels, list(self.routers), torch.stack(probabilities),
                           torch.stack(experts), torch.stack(weights))

    def _logits_first(self, layer: int, output) -> tuple[torch.Tensor, tuple]:
        """A router's output as (its first output: logits, or probabilities for PROBABILITY_ROUTERS; what follows)."""
        logits, rest = (output[0], output[1:]) if isinstance(output, tuple) else (output, ())
        if not (isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.shape[-1] == self.experts):
            raise StudioError(f"Layer {layer}'s router does not return its logits first (it returns "
                              f"{type(output).__name__}); its routing cannot be recorded.")
        return logits, rest

    def _model_choices(self, calls) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weights and experts the model itself used, when every call returned them."""
        if not all(len(rest) == 2 and not rest[1].is_floating_point() for _, rest in calls):
            return None
        weights = torch.cat([rest[0].reshape(-1, rest[0].shape[-1]) for _, rest in calls]).float().cpu()
        experts = torch.cat([rest[1].reshape(-1, rest[1].shape[-1]) for _, rest in calls]).long().cpu()
        return weights, experts

    def _top_k(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts


def _config_value(config, keys: tuple[str, ...], default: int) -> int:
    for key in keys:
        if getattr(config, key, None):
            return int(getattr(config, key))
    return default
