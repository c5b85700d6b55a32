"""Figures of a RouterTrace: plotly figures with expert names in every hover, and the text coloured by expert.

Each figure shows numbers taken straight from the trace's own summaries (RouterTrace.mean_probabilities,
expert_load, same_expert_rate, ...), so a figure and the trace it was made from always agree. Experts sit on
numeric axes labelled with their names: two experts may come from the same source model, and a categorical
axis would merge them (as it would merge repeated tokens).
"""

from __future__ import annotations

import html
from pathlib import Path

import plotly.graph_objects as go

from studio.inspect.quality import QualityReport
from studio.trace import RouterTrace

HEATMAP_SCALE = "Blues"


def expert_colours(count: int) -> list[str]:
    """One light colour per expert, evenly spaced in hue, so black text stays readable on every one."""
    return [f"hsl({round(360 * i / count)}, 65%, 75%)" for i in range(count)]


def layer_expert_heatmap(trace: RouterTrace, part: str = "prompt") -> go.Figure:
    """Mean router probability of each expert in each MoE layer, over the prompt's or the answer's tokens."""
    span = trace.span(part)
    figure = go.Figure(_mean_probability_heatmap(trace, part, colorbar={"title": "mean p"}))
    figure.update_layout(title=f"Mean router probability per layer, {part} ({len(trace.tokens[span])} tokens)")
    _expert_axis(figure, trace.labels, "x")
    figure.update_yaxes(title="layer", tickvals=list(range(len(trace.layers))), ticktext=list(map(str, trace.layers)),
                        autorange="reversed")
    return figure


def _mean_probability_heatmap(trace: RouterTrace, part: str, **style) -> go.Heatmap:
    hover = [[[trace.labels[e], layer] for e in range(len(trace.labels))] for layer in trace.layers]
    return go.Heatmap(
        z=trace.mean_probabilities(part).tolist(), x=list(range(len(trace.labels))), y=list(range(len(trace.layers))),
        customdata=hover, zmin=0, zmax=1, colorscale=HEATMAP_SCALE,
        hovertemplate="layer %{customdata[1]}<br>%{customdata[0]}<br>mean probability %{z:.3f}<extra></extra>", **style)


def token_expert_heatmap(trace: RouterTrace, layer: int) -> go.Figure:
    """Router probabilities of every token (x) over the experts (y) at decoder layer `layer`."""
    position = trace.layer_position(layer)
    z = trace.probabilities[position].T.tolist()
    chosen = [", ".join(trace.labels[e] for e in row) for row in trace.experts[position].tolist()]
    hover = [[[trace.labels[e], repr(token), t, trace.part_of(t), chosen[t]] for t, token in enumerate(trace.tokens)]
             for e in range(len(trace.labels))]
    figure = go.Figure(go.Heatmap(
        z=z, x=list(range(len(trace.tokens))), y=list(range(len(trace.labels))), customdata=hover, zmin=0, zmax=1,
        colorscale=HEATMAP_SCALE, colorbar={"title": "p"},
        hovertemplate="token %{customdata[2]} %{customdata[1]} (%{customdata[3]})<br>%{customdata[0]}: "
                      "p = %{z:.3f}<br>chosen: %{customdata[4]}<extra></extra>"))
    figure.add_vline(x=trace.prompt_length - 0.5, line_dash="dash", annotation_text="answer starts")
    figure.update_layout(title=f"Router probabilities per token, layer {layer}")
    figure.update_xaxes(title="token", tickvals=list(range(len(trace.tokens))), ticktext=trace.tokens, tickangle=-60)
    _expert_axis(figure, trace.labels, "y")
    figure.update_yaxes(autorange="reversed")  # expert 0 on top, as in the legends
    return figure


def expert_load_figure(trace: RouterTrace, part: str = "all") -> go.Figure:
    """Each expert's share of the top-k selections per layer, against uniform routing (Mixtral paper, Fig. 7)."""
    load = trace.expert_load(part)
    figure = go.Figure([go.Bar(x=list(map(str, trace.layers)), y=load[:, e].tolist(), name=label,
                               marker_color=colour, hovertemplate=f"{html.escape(label)}<br>layer %{{x}}<br>"
                                                                  f"share %{{y:.1%}}<extra></extra>")
                        for e, (label, colour) in enumerate(zip(trace.labels, expert_colours(len(trace.labels))))])
    figure.add_hline(y=trace.uniform_share, line_dash="dash", annotation_text=f"uniform 1/{len(trace.labels)}")
    figure.update_layout(barmode="group", title=f"Expert load per layer, {part} (share of top-{trace.top_k} "
                                                f"selections)", xaxis_title="layer", yaxis_title="share",
                         yaxis_tickformat=".0%")
    return figure


def same_expert_figure(trace: RouterTrace, part: str = "all") -> go.Figure:
    """Per layer, how often a token keeps the previous token's first-choice expert, against random routing."""
    figure = go.Figure(go.Bar(x=list(map(str, trace.layers)), y=trace.same_expert_rate(part).tolist(),
                              name="same first choice as previous token",
                              hovertemplate="layer %{x}<br>same expert %{y:.1%}<extra></extra>"))
    figure.add_hline(y=trace.uniform_share, line_dash="dash", annotation_text=f"random 1/{len(trace.labels)}")
    figure.update_layout(title=f"Consecutive tokens routed to the same expert, {part}", xaxis_title="layer",
                         yaxis_title="rate", yaxis_tickformat=".0%", yaxis_range=[0, 1])
    return figure


def token_text_html(trace: RouterTrace, layer: int) -> str:
    """The text with each token's background the colour of its first-choice expert at `layer`, with a legend
    (Mixtral paper, Fig. 8). Hovering a token shows the expert and its probability."""
    position = trace.layer_position(layer)
    colours = expert_colours(len(trace.labels))
    top1 = trace.top1()[position].tolist()
    spans = []
    for t, token in enumerate(trace.tokens):
        expert = top1[t]
        p = float(trace.probabilities[position, t, expert])
        spans.append(f'<span data-expert="{expert}" style="background:{colours[expert]}" '
                     f'title="{html.escape(trace.labels[expert])}, p = {p:.2f}">{html.escape(token)}</span>')
    legend = "".join(f'<span style="background:{colour};padding:0 6px;margin-right:8px">{html.escape(label)}</span>'
                     for label, colour in zip(trace.labels, colours))
    text = "pre-wrap;font-family:monospace;line-height:1.6"
    parts = [("Prompt", spans[:trace.prompt_length]), ("Answer", spans[trace.prompt_length:])]
    body = "".join(f'<p><b>{title}</b></p><div style="white-space:{text}">{"".join(part)}</div>'
                   for title, part in parts if part)  # a preview has no answer
    return (f'<div class="router-text" style="margin-bottom:2em"><div><b>Layer {layer}</b>, first-choice expert per '
            f'token: {legend}</div>{body}</div>')


def report_html(trace: RouterTrace, layer: int | None = None) -> str:
    """One self-contained page (plotly.js inlined, works offline): every figure, and the coloured text at
    every MoE layer. `layer` picks the token heatmap's layer (default: the last MoE layer)."""
    layer = trace.layers[-1] if layer is None else layer
    figures = [layer_expert_heatmap(trace, "prompt"), layer_expert_heatmap(trace, "answer"),
               token_expert_heatmap(trace, layer), expert_load_figure(trace), same_expert_figure(trace)]
    parts = [f.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, f in enumerate(figures)]
    parts += [token_text_html(trace, l) for l in trace.layers]
    return ('<!DOCTYPE html><html><head><meta charset="utf-8"><title>Router trace</title></head><body>'
            + "\n".join(parts) + "</body></html>")


def write_report(trace: RouterTrace, path: str | Path, layer: int | None = None) -> Path:
    path = Path(path)
    path.write_text(report_html(trace, layer), encoding="utf-8")
    return path


def _expert_axis(figure: go.Figure, labels: list[str], axis: str) -> None:
    ticks = {"tickvals": list(range(len(labels))), "ticktext": labels, "title": "expert"}
    (figure.update_xaxes if axis == "x" else figure.update_yaxes)(**ticks)


PART_WORDS = {"prompt": "tokens of each prompt", "answer": "tokens of each answer"}


def compare_heatmaps(traces: list[RouterTrace], titles: list[str], part: str = "prompt") -> go.Figure:
    """Layer x expert heatmaps of several traces side by side, one column each, on one colour scale."""
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=1, cols=len(traces), shared_yaxes=True, horizontal_spacing=0.02,
                           subplot_titles=[_short(t) for t in titles])
    for i, trace in enumerate(traces, start=1):
        figure.add_trace(_mean_probability_heatmap(trace, part, coloraxis="coloraxis"), row=1, col=i)
        figure.update_xaxes(tickvals=list(range(len(trace.labels))), ticktext=trace.labels, row=1, col=i)
    first = traces[0]
    figure.update_yaxes(tickvals=list(range(len(first.layers))), ticktext=list(map(str, first.layers)),
                        autorange="reversed", row=1, col=1, title="layer")
    figure.update_layout(coloraxis={"colorscale": HEATMAP_SCALE, "cmin": 0, "cmax": 1,
                                    "colorbar": {"title": "mean p"}},
                         title=f"Mean router probability per layer, over the {PART_WORDS[part]}")
    return figure


def confusion_figure(labels: list[str], intended: list[int], confusion: list[list[int]]) -> go.Figure:
    """Routing evaluation: for each intended expert (rows), how many (prompt, layer) pairs went to each expert."""
    figure = go.Figure(go.Heatmap(
        z=confusion, x=list(range(len(labels))), y=list(range(len(intended))), colorscale=HEATMAP_SCALE,
        text=[[str(v) for v in row] for row in confusion], texttemplate="%{text}", colorbar={"title": "pairs"},
        customdata=[[[labels[k], labels[e]] for e in range(len(labels))] for k in intended],
        hovertemplate="intended %{customdata[0]}<br>chosen %{customdata[1]}<br>%{z} (prompt, layer) pairs"
                      "<extra></extra>"))
    figure.update_layout(title="Routing of held-out prompts: intended expert against chosen expert")
    _expert_axis(figure, labels, "x")
    figure.update_xaxes(title="chosen expert")
    figure.update_yaxes(tickvals=list(range(len(intended))), ticktext=[labels[k] for k in intended],
                        title="intended expert", autorange="reversed")
    return figure


def quality_figure(report: QualityReport) -> go.Figure:
    """Per domain, the held-out loss of the base, the MoE and the expert alone (lower is better); each domain's
    label says the share of the expert's gain the MoE recovers."""
    names = [f"{Path(d.expert).name}<br>recovered {'n/a' if d.recovered != d.recovered else f'{d.recovered:.0%}'}"
             for d in report.domains]
    figure = go.Figure()
    for label, values, colour in (("base", [d.base for d in report.domains], "#9e9e9e"),
                                  ("MoE", [d.moe for d in report.domains], "#1f77b4"),
                                  ("expert alone", [d.expert_alone for d in report.domains], "#2ca02c")):
        figure.add_bar(name=label, x=names, y=values, marker_color=colour, text=[f"{v:.3f}" for v in values],
                       textposition="outside", hovertemplate=f"{label}: %{{y:.3f}} nats per token<extra></extra>")
    figure.update_layout(barmode="group", title="Held-out loss per domain: base, MoE, expert alone",
                         yaxis_title="nats per token (lower is better)")
    return figure


def _short(text: str, length: int = 40) -> str:
    text = " ".join(text.split())
    return html.escape(text if len(text) <= length else text[:length - 1] + "…")
