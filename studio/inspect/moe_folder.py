"""One way to open an MoE for chat, route, eval-routing and the UI, with one set of messages.

Opening goes through studio.sources (named errors for a missing folder, a config.json that is not an object, a
string where a number belongs, unreadable or code-running weights), then the config is checked against the
weights it describes: a config.json claiming 8 experts over routers with 4 rows would otherwise end in a shape
error deep inside transformers.
"""

from __future__ import annotations

import re
from pathlib import Path

from studio.errors import StudioError
from studio.families import family_of
from studio.moe_layouts import EXPERT_COUNT_KEYS, TOP_K_KEYS, config_entry, router_rows, text_config
from studio.sources import ModelSource, nonfinite_count, open_model, read_json
# A router's weight: `...layers.N.<block>.gate.weight` (Mixtral, Qwen-MoE, DeepSeek, Phi MoE) or `.router.weight`;
# not a shared expert's one-row gate, nor an MLP's gate_proj.
ROUTER_WEIGHT = re.compile(r"layers\.(\d+)\.(?:[\w.]+\.)?(?:gate|router)\.weight$")
LAYER = re.compile(r"\blayers\.(\d+)\.")
EXPERT_LAYER = re.compile(r"\blayers\.(\d+)\.(?:[\w.]+\.)?experts\.")


def open_moe_folder(model: str | Path, tqdm_class: type | None = None) -> ModelSource:
    """The model's source (downloaded when a Hub id), its config checked against its weights."""
    source = open_model(str(model), tqdm_class=tqdm_class)
    if source.file("generation_config.json"):  # transformers reads it too, and fails with a vaguer message
        read_json(source.folder / "generation_config.json", "fix or delete the model's generation_config.json")
    check_config_matches_weights(source)
    check_routers_finite(source)
    return source


def check_routers_finite(source: ModelSource) -> None:
    """A router with NaN or Inf gives every token NaN probabilities: chat answers nothing, without a word. Routers
    are small (experts x hidden per layer), so each is read and checked."""
    for name in sorted(n for n in source.tensors if ROUTER_WEIGHT.search(n)):
        bad = nonfinite_count(source.read(name))
        if bad:
            raise StudioError(f"Model {source.label}: the router {name} in {source.tensors[name].path.name} holds "
                              f"{bad:,} non-finite values (NaN or Inf), so its routing (and every answer) would be "
                              f"empty or arbitrary. Merge the model again: the studio checks routers before writing.")


def check_config_matches_weights(source: ModelSource) -> None:
    """Named errors for a config.json whose expert count, hidden size or layer count the routers contradict."""
    experts = config_entry(source.config, EXPERT_COUNT_KEYS)
    routers = {name: info for name, info in source.tensors.items() if ROUTER_WEIGHT.search(name)}
    if experts is None or not routers:
        return  # not an MoE, or one whose routers are named otherwise: the loader says what it finds
    (key, count), hidden = experts, text_config(source.config).get("hidden_size")
    model_type = source.config.get("model_type")
    if family_of(model_type) is not None:
        raise StudioError(f"Model {source.label}: config.json says model_type {model_type!r}, a dense model, but the "
                          f"weights hold routers: transformers would load it without its experts. Fix model_type "
                          f"(a merge of ours is `mixtral`, `qwen2_moe`, `qwen3_moe`, `deepseek` or `phimoe`).")
    top_k = config_entry(source.config, TOP_K_KEYS)
    if top_k is not None and not 1 <= top_k[1] <= count:
        raise StudioError(f"Model {source.label}: config.json says {top_k[0]} = {top_k[1]}, but it must be between "
                          f"1 and the {count} experts. Fix config.json.")
    embedding = next((info for name, info in source.tensors.items() if name.endswith("embed_tokens.weight")), None)
    vocab = source.config.get("vocab_size")
    if embedding is not None and isinstance(vocab, int) and embedding.shape[0] != vocab:
        raise StudioError(f"Model {source.label}: config.json says vocab_size = {vocab}, but the embedding in "
                          f"{embedding.path.name} has {embedding.shape[0]} rows: the config does not match the "
                          f"weights. Fix config.json, or download the model again.")
    for name, info in sorted(routers.items()):
        if len(info.shape) != 2:
            continue
        if info.shape[0] not in (count, router_rows(source.config)):
            raise StudioError(f"Model {source.label}: config.json says {key} = {count}, but the router {name} in "
                              f"{info.path.name} has {info.shape[0]} rows (one per expert): the config does not "
                              f"match the weights. Fix config.json, or download the model again.")
        if isinstance(hidden, int) and info.shape[1] != hidden:
            raise StudioError(f"Model {source.label}: config.json says hidden_size = {hidden}, but the router {name} "
                              f"in {info.path.name} reads {info.shape[1]} values: the config does not match the "
                              f"weights. Fix config.json, or download the model again.")
    _check_layers(source, {int(ROUTER_WEIGHT.search(name)[1]) for name in routers})


def _check_layers(source: ModelSource, router_layers: set[int]) -> None:
    """Every layer the config promises is in the weights, and every layer with experts has its router: what is
    missing, transformers fills with random numbers and only logs it."""
    layers = source.config.get("num_hidden_layers")
    found = 1 + max(router_layers)
    if isinstance(layers, int) and found > layers:
        raise StudioError(f"Model {source.label}: config.json says num_hidden_layers = {layers}, but the weights "
                          f"hold routers up to layer {found - 1}: the config does not match the weights. Fix "
                          f"config.json, or download the model again.")
    held = {int(m[1]) for name in source.tensors if (m := LAYER.search(name))}
    if isinstance(layers, int) and held and max(held) + 1 < layers:
        raise StudioError(f"Model {source.label}: config.json says num_hidden_layers = {layers}, but the weights hold "
                          f"layers 0 to {max(held)} only: the missing layers would be random. Fix config.json, or "
                          f"download the model again.")
    with_experts = {int(m[1]) for name in source.tensors if (m := EXPERT_LAYER.search(name))}
    missing = sorted(with_experts - router_layers)
    if missing:
        raise StudioError(f"Model {source.label}: layer {missing[0]} has experts but no router in its weights (a "
                          f"router would be random). The checkpoint is incomplete; download the model again.")
