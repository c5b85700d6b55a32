"""Router scores of a loaded MoE model: for every token and layer, the probabilities over experts and the choice.

`RouterCapture` hooks every router while the model runs (a plain forward, or generation: the prompt, then each
new token) and makes a RouterTrace: the probabilities as the model defines them (softmax or sigmoid of the
router's logits, studio.moe_layouts says which) and the experts the model runs, read where its experts module
is called, so that routing biases and grouped choices count as they do in the model.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from studio.errors import StudioError
from studio.moe_layouts import TOP_K_KEYS, config_value, expert_count, extra_labels, layout_of, model_class, \
    router_width, text_config
from studio.trace import RouterTrace

# A module inside decoder layer N (`layers.N`, DBRX's `blocks.N`), and its own name.
ROUTER_NAME = re.compile(r"\b(?:layers|blocks)\.(\d+)\.(?:.+\.)?(\w+)$")


def load_moe(path: str | Path, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Model and tokenizer of a merged (or any Hub) MoE, on CPU, for analysis. The folder is opened and checked as
    chat opens it (studio.inspect.moe_folder), so a broken model gets the same named error in every command."""
    from transformers import AutoConfig, AutoTokenizer

    from studio.inspect.moe_folder import open_moe_folder

    source = open_moe_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        raise StudioError(f"Model {path}: its tokenizer cannot be loaded from {source.folder} "
                          f"({type(exc).__name__}: {str(exc)[:200]}).") from exc
    try:
        config = AutoConfig.from_pretrained(source.folder, trust_remote_code=trust_remote_code)
        model = model_class(config, trust_remote_code).from_pretrained(source.folder, dtype=dtype,
                                                                        trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise StudioError(f"Model {path}: transformers cannot load it ({type(exc).__name__}: {str(exc)[:200]}). If "
                          f"it ships its own code and you trust it, pass trust_remote_code (--trust-remote-code).") \
            from exc
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


def router_labels(path: str | Path, config) -> list[str]:
    """One name per router output: the experts (expert_labels), then any zero or skip experts."""
    return expert_labels(path, expert_count(config)) + extra_labels(config)


def num_experts(model) -> int:
    """Outputs of each router of a loaded model (routed experts, and zero or skip experts where it has them)."""
    return router_width(model.config)


@torch.inference_mode()
def route_sequence(model, input_ids: list[int], labels: list[str] | None = None,
                   tokens: list[str] | None = None) -> RouterTrace:
    """The RouterTrace of one plain forward over `input_ids` (no generation); `tokens` are their texts (the ids
    as strings without them)."""
    labels = labels or [f"expert {i}" for i in range(num_experts(model))]
    device = model.get_input_embeddings().weight.device
    with RouterCapture(model) as capture:
        model(input_ids=torch.tensor([input_ids], device=device), use_cache=False)
    return capture.trace(input_ids, tokens or [str(i) for i in input_ids], len(input_ids), labels)


def router_probabilities(model, input_ids: list[int]) -> torch.Tensor:
    """(layers, tokens, experts): each MoE layer's router probabilities for one sequence."""
    return route_sequence(model, input_ids).probabilities


def find_routers(model) -> dict[int, torch.nn.Module]:
    """Each MoE layer's router, by decoder-layer index: a module with one of the family's router names (gate,
    router) inside `layers.N`, with an output per expert. Dense layers, and gates of one output (Qwen2-MoE's
    shared-expert gate), have none."""
    count, layout = expert_count(model.config), layout_of(model.config)
    names, width = layout.names, layout.logits.width(count)
    routers: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        match = ROUTER_NAME.search(name)
        if match and match[2] in names and (_outputs(module) or 0) >= width and ".experts." not in name:
            routers.setdefault(int(match[1]), module)
    if not routers:
        raise StudioError(f"No router found in {type(model).__name__} ({getattr(model.config, 'model_type', '?')}): "
                          f"no module named {' or '.join(names)} with {count} outputs inside its layers. Its "
                          f"routing cannot be recorded.")
    return dict(sorted(routers.items()))


def _outputs(module: torch.nn.Module) -> int | None:
    """Output width of a router: an nn.Linear (or a quantized one), a module holding an (experts, hidden) weight,
    or a module whose projection is its last linear child (Gemma 4's `proj`, Hunyuan's `wg`, LongCat's
    `classifier`, ZAYA's MLP)."""
    if getattr(module, "out_features", None):
        return module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return weight.shape[0]
    widths = [child.out_features for child in module.modules() if getattr(child, "out_features", None)]
    return widths[-1] if widths else None


def _experts_modules(model, routers: dict[int, torch.nn.Module]) -> dict[int, torch.nn.Module]:
    """Each router's sibling `experts` module, which the MoE block calls with the chosen experts and weights."""
    modules = dict(model.named_modules())
    names = {module: name for name, module in modules.items()}
    found = {}
    for layer, router in routers.items():
        sibling = modules.get(names[router].rpartition(".")[0] + ".experts")
        if sibling is not None and not isinstance(sibling, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            found[layer] = sibling
    return found


class RouterCapture:
    """Forward hooks on every router, and on the experts module beside it, while active: each call's outputs are
    kept as they come, and turned into probabilities only when the trace is built, so capture adds almost
    nothing to a generation step.

    A router fires once for the prompt (tokens, experts), then once per generated token (1, experts). Its output
    is a tuple whose first item is the logits in transformers 5 (the convention of nearly every MoE there;
    studio.moe_layouts lists the others), and the logits tensor in 4.x. The experts module is called with
    (hidden states, chosen experts, their weights): the choice the model runs. Where it is not (Llama 4, and
    transformers 4.x), the router's own choice is used, or the top k of the probabilities.
    """

    def __init__(self, model):
        config = text_config(model.config)
        self.layout = layout_of(config)
        self.routers = find_routers(model)
        self.experts = router_width(config)
        self.top_k = config_value(config, TOP_K_KEYS) or 2
        renormalize = getattr(config, "norm_topk_prob", True) if self.layout.renormalize is None \
            else self.layout.renormalize
        self.renormalize = bool(renormalize)  # Mixtral renormalizes
        self.calls: dict[int, list] = {layer: [] for layer in self.routers}
        self.runs: dict[int, list] = {layer: [] for layer in self.routers}
        self._experts_modules = _experts_modules(model, self.routers)
        self._handles: list = []

    def __enter__(self) -> "RouterCapture":
        self._handles = [router.register_forward_hook(self._recorder(self.calls[layer]))
                         for layer, router in self.routers.items()]
        self._handles += [module.register_forward_pre_hook(self._run_recorder(self.runs[layer]), with_kwargs=True)
                          for layer, module in self._experts_modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @staticmethod
    def _recorder(calls: list):
        def record(module, args, output) -> None:
            calls.append(output)

        return record

    @staticmethod
    def _run_recorder(runs: list):
        def record(module, args, kwargs) -> None:
            tensors = [t for t in (*args[1:], *kwargs.values()) if isinstance(t, torch.Tensor)]
            indices = next((t for t in tensors if not t.is_floating_point()), None)
            weights = next((t for t in tensors if t.is_floating_point()), None)
            if indices is not None and weights is not None:
                runs.append((weights.detach(), indices.detach()))

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
            probs = self._probabilities(logits)
            chosen = self._experts_run(layer, logits.shape[0]) or self._model_choices(calls) or self._top_k(probs)
            order = chosen[0].argsort(dim=-1, descending=True, stable=True)  # best first
            probabilities.append(probs)
            weights.append(chosen[0].gather(-1, order))
            experts.append(chosen[1].gather(-1, order))
        return RouterTrace(tokens=tokens, token_ids=token_ids, prompt_length=prompt_length, labels=labels,
                           layers=list(self.routers), probabilities=torch.stack(probabilities),
                           experts=torch.stack(experts), weights=torch.stack(weights))

    def _probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        scoring = {"softmax": lambda x: x.softmax(dim=-1), "sigmoid": torch.sigmoid, "probabilities": lambda x: x}
        return scoring[self.layout.scoring](logits)

    def _logits_first(self, layer: int, output) -> tuple[torch.Tensor, tuple]:
        """A router's output as (its logits, or probabilities for routers that give them; the outputs after)."""
        position = self.layout.logits_output % len(output) if isinstance(output, tuple) else 0
        logits, rest = (output[position], output[position + 1:]) if isinstance(output, tuple) else (output, ())
        if isinstance(logits, torch.Tensor) and logits.is_floating_point():
            logits = self.layout.logits.expert_logits(logits)
        if not (isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.shape[-1] == self.experts):
            raise StudioError(f"Layer {layer}'s router does not return its logits first (it returns "
                              f"{type(output).__name__}); its routing cannot be recorded.")
        return logits, rest

    def _experts_run(self, layer: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weights and experts the experts module was called with, when it was called once per router call."""
        runs = self.runs[layer]
        if not runs or len(runs) != len(self.calls[layer]):
            return None
        weights = torch.cat([w.reshape(-1, w.shape[-1]) for w, _ in runs]).float().cpu()
        experts = torch.cat([e.reshape(-1, e.shape[-1]) for _, e in runs]).long().cpu()
        return (weights, experts) if weights.shape == experts.shape and experts.shape[0] == tokens else None

    def _model_choices(self, calls) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The weights and experts the router itself returned, when every call returned them."""
        if not all(len(rest) >= 2 and isinstance(rest[1], torch.Tensor) and not rest[1].is_floating_point()
                   for _, rest in calls):
            return None
        weights = torch.cat([rest[0].reshape(-1, rest[0].shape[-1]) for _, rest in calls]).float().cpu()
        experts = torch.cat([rest[1].reshape(-1, rest[1].shape[-1]) for _, rest in calls]).long().cpu()
        return weights, experts

    def _top_k(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights, experts = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights, experts
