"""What the routers decided for one sequence: per MoE layer and token, the softmax over experts and the choice.

A RouterTrace is plain data (tokens, tensors, expert names) with the summaries the figures and tables show.
It is saved to JSON and read back exactly, and exported as CSV with one row per token and layer.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from studio.errors import StudioError

PARTS = ("prompt", "answer", "all")
FORMAT = "moe-studio-router-trace/1"


@dataclass
class RouterTrace:
    tokens: list[str]  # each token's text, prompt first, then answer
    token_ids: list[int]
    prompt_length: int  # tokens[:prompt_length] are the prompt
    labels: list[str]  # expert names (source models of a merge)
    layers: list[int]  # decoder-layer index of each MoE layer
    probabilities: torch.Tensor  # (MoE layers, tokens, experts) float32, softmax of the router logits
    experts: torch.Tensor  # (MoE layers, tokens, k) int64, the chosen experts, best first
    weights: torch.Tensor  # (MoE layers, tokens, k) float32, the weight of each chosen expert in the output

    def __post_init__(self) -> None:
        shape = (len(self.layers), len(self.tokens), len(self.labels))
        if tuple(self.probabilities.shape) != shape or self.experts.shape[:2] != shape[:2] \
                or self.weights.shape != self.experts.shape or len(self.token_ids) != len(self.tokens):
            raise StudioError(f"Router trace shapes disagree: probabilities {tuple(self.probabilities.shape)}, "
                              f"experts {tuple(self.experts.shape)} for {shape[0]} layers, {shape[1]} tokens and "
                              f"{shape[2]} experts. The file is damaged; record the trace again.")

    @property
    def top_k(self) -> int:
        return self.experts.shape[-1]

    @property
    def uniform_share(self) -> float:
        """Each expert's share of the selections if routing were uniform (the Mixtral paper's Figure 7 line)."""
        return 1 / len(self.labels)

    def span(self, part: str) -> slice:
        """Token positions of the prompt, the answer, or all of them."""
        spans = {"prompt": slice(0, self.prompt_length), "answer": slice(self.prompt_length, len(self.tokens)),
                 "all": slice(0, len(self.tokens))}
        if part not in spans:
            raise StudioError(f"Unknown part {part!r}; choose one of {', '.join(PARTS)}.")
        return spans[part]

    def part_of(self, position: int) -> str:
        return "prompt" if position < self.prompt_length else "answer"

    def layer_position(self, layer: int) -> int:
        """Position in the trace of decoder layer `layer`."""
        if layer not in self.layers:
            raise StudioError(f"Layer {layer} has no router; the MoE layers are {', '.join(map(str, self.layers))}.")
        return self.layers.index(layer)

    def mean_probabilities(self, part: str = "all") -> torch.Tensor:
        """(layers, experts): the router's mean probability of each expert over the part's tokens."""
        return self.probabilities[:, self.span(part)].mean(dim=1)

    def top1(self) -> torch.Tensor:
        """(layers, tokens): each token's first-choice expert."""
        return self.experts[..., 0]

    def expert_load(self, part: str = "all") -> torch.Tensor:
        """(layers, experts): each expert's share of the part's top-k selections (rows sum to 1)."""
        chosen = self.experts[:, self.span(part)].reshape(len(self.layers), -1)
        counts = torch.stack([torch.bincount(row, minlength=len(self.labels)) for row in chosen]).float()
        return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)

    def same_expert_rate(self, part: str = "all") -> torch.Tensor:
        """(layers,): how often a token's first choice equals the previous token's, within the part."""
        top1 = self.top1()[:, self.span(part)]
        return (top1[:, 1:] == top1[:, :-1]).float().mean(dim=1).nan_to_num(0.0)

    def dominant(self, part: str = "all") -> list[tuple[int, float]]:
        """Per layer, the expert first-chosen most often in the part, and its share of the part's tokens."""
        top1 = self.top1()[:, self.span(part)]
        result = []
        for row in top1:
            counts = torch.bincount(row, minlength=len(self.labels))
            best = int(counts.argmax())
            result.append((best, float(counts[best]) / max(len(row), 1)))
        return result

    def to_dict(self) -> dict:
        return {"format": FORMAT, "tokens": self.tokens, "token_ids": self.token_ids,
                "prompt_length": self.prompt_length, "labels": self.labels, "layers": self.layers,
                "probabilities": self.probabilities.tolist(), "experts": self.experts.tolist(),
                "weights": self.weights.tolist()}

    @classmethod
    def from_dict(cls, data: dict) -> "RouterTrace":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise StudioError(f"Not a router trace: expected a JSON object with \"format\": \"{FORMAT}\".")
        layers, tokens = len(data["layers"]), len(data["tokens"])
        return cls(list(data["tokens"]), list(data["token_ids"]), int(data["prompt_length"]), list(data["labels"]),
                   list(data["layers"]), _tensor(data["probabilities"], torch.float32, layers, tokens),
                   _tensor(data["experts"], torch.int64, layers, tokens),
                   _tensor(data["weights"], torch.float32, layers, tokens))

    def save(self, path: str | Path) -> None:
        """JSON; float32 values are written exactly (as the doubles they convert to)."""
        Path(path).write_text(json.dumps(self.to_dict()), encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> "RouterTrace":
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except OSError as exc:
            raise StudioError(f"Cannot read router trace {path}: {exc.strerror}.") from None
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise StudioError(f"{path} is not a router trace ({type(exc).__name__}: {exc}). Save one with "
                              f"RouterTrace.save or `python -m studio route --json`.") from None

    def to_csv(self) -> str:
        """One row per (token, MoE layer): position, part, token, layer, chosen experts, weights, probabilities."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["position", "part", "token_id", "token", "layer",
                         *(f"choice{i + 1}" for i in range(self.top_k)), *(f"weight{i + 1}" for i in range(self.top_k)),
                         *(f"p[{label}]" for label in self.labels)])
        for t, (token_id, token) in enumerate(zip(self.token_ids, self.tokens)):
            for l, layer in enumerate(self.layers):
                writer.writerow([t, self.part_of(t), token_id, token, layer,
                                 *(self.labels[e] for e in self.experts[l, t].tolist()),
                                 *(repr(w) for w in self.weights[l, t].tolist()),
                                 *(repr(p) for p in self.probabilities[l, t].tolist())])
        return out.getvalue()


def _tensor(values: list, dtype: torch.dtype, layers: int, tokens: int) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).reshape(layers, tokens, -1)


def save_traces(traces: list[RouterTrace], json_path: str | Path, csv_path: str | Path) -> None:
    """Several traces (one per prompt): a JSON list of traces, and one CSV whose first column is the prompt's
    index (the rest as in RouterTrace.to_csv)."""
    Path(json_path).write_text(json.dumps([t.to_dict() for t in traces]), encoding="utf-8")
    lines = []
    for i, trace in enumerate(traces):
        header, *rows = trace.to_csv().splitlines(keepends=True)
        lines += ([f"prompt,{header}"] if i == 0 else []) + [f"{i},{row}" for row in rows]
    Path(csv_path).write_text("".join(lines), encoding="utf-8")
