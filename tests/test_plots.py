"""Each figure holds exactly the numbers of the trace it was made from, with expert names where people look."""

from __future__ import annotations

import dataclasses
from html.parser import HTMLParser

import pytest

from studio.errors import StudioError
from studio.inspect import plots
from studio.inspect.chat import ChatSettings, load_chat_model
from studio.trace import RouterTrace

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trace(tiny_moes) -> RouterTrace:
    """A real trace: a random Qwen3-MoE (8 experts, 3 MoE layers) answering greedily."""
    chat = load_chat_model(tiny_moes["qwen3_moe"], "fp32", "cpu")
    reply = chat.reply([{"role": "user", "content": "Tell me <about> & \"fish\"\n"}],
                       ChatSettings(temperature=0, max_new_tokens=10))
    return dataclasses.replace(reply.trace, labels=[f"org/expert-{e}" for e in range(8)])


@pytest.mark.parametrize("part", ["prompt", "answer"])
def test_layer_expert_heatmap_holds_the_mean_probabilities(trace, part):
    figure = plots.layer_expert_heatmap(trace, part)
    heatmap = figure.data[0]
    assert [list(row) for row in heatmap.z] == trace.mean_probabilities(part).tolist()
    assert list(figure.layout.xaxis.ticktext) == trace.labels and list(figure.layout.xaxis.tickvals) == list(range(8))
    assert list(figure.layout.yaxis.ticktext) == ["0", "1", "2"]
    assert [list(cell) for cell in heatmap.customdata[1]] == [[label, 1] for label in trace.labels]
    assert part in figure.layout.title.text


def test_experts_with_the_same_name_keep_their_own_column(trace):
    same = dataclasses.replace(trace, labels=["org/same"] * 8)
    figure = plots.layer_expert_heatmap(same, "answer")
    assert len(figure.data[0].z[0]) == 8 and list(figure.layout.xaxis.tickvals) == list(range(8))


def test_token_expert_heatmap_holds_one_layers_probabilities(trace):
    figure = plots.token_expert_heatmap(trace, 1)
    heatmap = figure.data[0]
    assert [list(row) for row in heatmap.z] == trace.probabilities[1].T.tolist()
    assert list(figure.layout.xaxis.ticktext) == trace.tokens
    assert figure.layout.shapes[0].x0 == trace.prompt_length - 0.5
    t = trace.prompt_length + 2
    label, token, position, part, chosen = heatmap.customdata[3][t]
    assert (label, token, position, part) == (trace.labels[3], repr(trace.tokens[t]), t, "answer")
    assert chosen == ", ".join(trace.labels[e] for e in trace.experts[1, t].tolist())


@pytest.mark.parametrize("part", ["prompt", "answer", "all"])
def test_expert_load_figure_holds_the_shares_of_selections(trace, part):
    figure = plots.expert_load_figure(trace, part)
    load = trace.expert_load(part)
    assert [bar.name for bar in figure.data] == trace.labels
    assert [list(bar.y) for bar in figure.data] == load.T.tolist()
    assert figure.layout.shapes[0].y0 == 1 / 8


def test_same_expert_figure_holds_the_rates_and_the_random_baseline(trace):
    figure = plots.same_expert_figure(trace, "answer")
    assert list(figure.data[0].y) == trace.same_expert_rate("answer").tolist()
    assert list(figure.data[0].x) == ["0", "1", "2"]
    assert figure.layout.shapes[0].y0 == 1 / 8


class Spans(HTMLParser):
    """The token spans of a coloured text: (expert, background, text), prompt and answer apart."""

    def __init__(self):
        super().__init__()
        self.sections: list[list] = []
        self.legend: list[str] = []
        self.current: list | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "span" and "data-expert" in attrs:
            self.current = [int(attrs["data-expert"]), attrs["style"].removeprefix("background:"), ""]
            self.sections[-1].append(self.current)
        elif tag == "span":
            self.current = None
            self.legend.append(attrs["style"].split(";")[0].removeprefix("background:"))
        elif tag == "div" and "white-space" in attrs.get("style", ""):
            self.sections.append([])

    def handle_data(self, data):
        if self.current is not None:
            self.current[2] += data

    def handle_endtag(self, tag):
        if tag == "span":
            self.current = None


def test_token_text_colours_each_token_by_its_first_choice(trace):
    parser = Spans()
    parser.feed(plots.token_text_html(trace, 2))
    prompt, answer = parser.sections
    assert len(prompt) == trace.prompt_length and len(answer) == len(trace.tokens) - trace.prompt_length
    colours = plots.expert_colours(8)
    assert [(e, colour) for e, colour, _ in prompt + answer] == [(e, colours[e]) for e in trace.top1()[2].tolist()]
    assert "".join(text for _, _, text in prompt + answer) == "".join(trace.tokens)
    assert parser.legend == colours
    html = plots.token_text_html(trace, 2)
    assert all(label in html for label in trace.labels)
    assert "<about>" not in html and all(escaped in html for escaped in ("&lt;", "&gt;", "&amp;", "&quot;"))
    assert "<b>Answer</b>" in html


def test_token_text_of_a_prompt_alone_has_no_answer_section(trace):
    prompt_only = dataclasses.replace(trace, prompt_length=len(trace.tokens))
    html = plots.token_text_html(prompt_only, 2)
    assert "<b>Prompt</b>" in html and "<b>Answer</b>" not in html


def test_report_holds_every_figure_and_each_layers_text(trace, tmp_path):
    path = plots.write_report(trace, tmp_path / "report.html", layer=0)
    page = path.read_text()
    assert page.count('class="router-text"') == 3 and page.count("Plotly.newPlot") == 5
    assert "Router probabilities per token, layer 0" in page
    assert len(set(plots.expert_colours(100))) == 100
    with pytest.raises(StudioError, match="Layer 5 has no router"):
        plots.token_expert_heatmap(trace, 5)


def test_side_by_side_heatmaps_hold_each_traces_probabilities(trace):
    other = dataclasses.replace(trace, probabilities=trace.probabilities.flip(-1))
    figure = plots.compare_heatmaps([trace, other], ["first prompt", "x" * 80], part="prompt")
    assert [[list(row) for row in h.z] for h in figure.data] == [trace.mean_probabilities("prompt").tolist(),
                                                                other.mean_probabilities("prompt").tolist()]
    assert all(h.coloraxis == "coloraxis" for h in figure.data)  # one colour scale for every prompt
    titles = [a.text for a in figure.layout.annotations]
    assert titles[0] == "first prompt" and len(titles[1]) == 40


def test_confusion_figure_holds_the_counts():
    figure = plots.confusion_figure(["a/code", "a/math", "a/chat"], [2, 0], [[1, 0, 5], [4, 2, 0]])
    assert [list(row) for row in figure.data[0].z] == [[1, 0, 5], [4, 2, 0]]
    assert list(figure.layout.yaxis.ticktext) == ["a/chat", "a/code"]
    assert list(figure.layout.xaxis.ticktext) == ["a/code", "a/math", "a/chat"]


def test_several_traces_export_to_one_json_and_one_csv(trace, tmp_path):
    import csv
    import json

    from studio.trace import save_traces

    other = dataclasses.replace(trace, probabilities=trace.probabilities.flip(-1))
    save_traces([trace, other], tmp_path / "t.json", tmp_path / "t.csv")
    loaded = [RouterTrace.from_dict(d) for d in json.loads((tmp_path / "t.json").read_text())]
    assert [t.probabilities.tolist() for t in loaded] == [trace.probabilities.tolist(), other.probabilities.tolist()]
    rows = list(csv.reader((tmp_path / "t.csv").open()))
    assert rows[0][:3] == ["prompt", "position", "part"]
    per_trace = len(trace.tokens) * len(trace.layers)
    assert len(rows) == 1 + 2 * per_trace
    assert {r[0] for r in rows[1:per_trace + 1]} == {"0"} and {r[0] for r in rows[per_trace + 1:]} == {"1"}
    assert rows[-1][1:] == next(csv.reader(other.to_csv().splitlines()[-1:]))


def test_quality_figure_shows_each_loss_and_the_recovered_share():
    from studio.inspect.plots import quality_figure
    from studio.inspect.quality import DomainQuality, QualityReport

    report = QualityReport([DomainQuality("assets/zoo/math", 100, 1.3, 1.0, 1.06),
                            DomainQuality("assets/zoo/chat", 100, 0.33, 0.33, 0.32)])
    figure = quality_figure(report)
    assert [t.name for t in figure.data] == ["base", "MoE", "expert alone"]
    assert [list(t.y) for t in figure.data] == [[1.3, 0.33], [1.06, 0.32], [1.0, 0.33]]
    assert list(figure.data[0].x) == ["math<br>recovered 80%", "chat<br>recovered n/a"]
