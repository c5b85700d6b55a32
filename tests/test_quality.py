"""The quality measure: held-out losses of base, expert and MoE, and the share of each expert's gain kept."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from huggingface_hub.utils import are_progress_bars_disabled
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils.logging import is_progress_bar_enabled

from studio.app.cli import main
from studio.build.merge import MergeOptions, merge
from studio.config import parse_config
from studio.errors import StudioError
from studio.inspect.quality import DomainQuality, load_texts, mean_loss, measure_quality

ROOT = Path(__file__).resolve().parents[1]
ZOO = ROOT / "assets" / "zoo"
STORY = ("Once upon a time, there was a kind fox named Vera who lived in a quiet village. More than anything, Vera "
         "wanted to see the sea. One day Vera set off on a journey. ") * 3


def test_recovered_share_is_the_expert_gain_kept():
    assert DomainQuality("math", 10, base=2.0, expert_alone=1.0, moe=1.5).recovered == 0.5
    assert DomainQuality("math", 10, base=2.0, expert_alone=1.0, moe=2.5).recovered == -0.5
    assert math.isnan(DomainQuality("math", 10, base=1.0, expert_alone=1.0, moe=0.9).recovered)


def test_mean_loss_is_the_mean_next_token_cross_entropy():
    model = AutoModelForCausalLM.from_pretrained(ZOO / "stories", dtype=torch.float32).eval()
    ids = torch.tensor(AutoTokenizer.from_pretrained(ZOO / "base")(STORY, add_special_tokens=False)["input_ids"])
    window = 16
    usable = (len(ids) - 1) // window * window
    with torch.inference_mode():
        logits = model(input_ids=ids[:usable].view(-1, window)).logits
    targets = ids[:usable].view(-1, window)[:, 1:]
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1))
    assert mean_loss(model, ids, window=window) == pytest.approx(expected.item(), rel=1e-5)


@pytest.fixture(scope="module")
def one_expert_moe(tmp_path_factory, monkeypatch_module):
    """Four copies of the zoo's math expert behind random routers: the MoE is the math expert, whatever the routing."""
    monkeypatch_module.chdir(ROOT)
    data = {"base_model": "assets/zoo/base", "gate_mode": "random", "dtype": "bfloat16",
            "experts": [{"source_model": "assets/zoo/math"} for _ in range(4)]}
    out = tmp_path_factory.mktemp("quality") / "moe"
    merge(parse_config(data), out, MergeOptions(allow_identical_experts=True, random_seed=0), log=lambda m: None)
    return out


def test_an_moe_of_one_expert_keeps_all_of_its_gain(one_expert_moe):
    report = measure_quality(one_expert_moe, {"0": "12 + 7 = 19\n45 - 18 = 27\n6 * 7 = 42\n" * 40},
                             log=lambda m: None)
    (math_domain,) = report.domains
    assert math_domain.expert == "assets/zoo/math" and math_domain.tokens > 200
    assert math_domain.moe == pytest.approx(math_domain.expert_alone, abs=2e-3)
    assert math_domain.expert_alone < math_domain.base
    assert math_domain.recovered == pytest.approx(1.0, abs=0.02)


def test_texts_file_takes_strings_and_files(tmp_path):
    (tmp_path / "story.txt").write_text(STORY)
    path = tmp_path / "texts.yml"
    path.write_text(yaml.safe_dump({"stories": [{"file": "story.txt"}, "The end."], 1: "12 + 7 = 19"}))
    assert load_texts(path) == {"stories": STORY + "\n\nThe end.", 1: "12 + 7 = 19"}
    path.write_text(yaml.safe_dump({"stories": [{"file": "nowhere.txt"}]}))
    with pytest.raises(StudioError, match="Texts for 'stories': .*nowhere.txt is not a file"):
        load_texts(path)


def test_quality_cli_prints_the_table(one_expert_moe, tmp_path, capsys):
    path = tmp_path / "texts.yml"
    path.write_text(yaml.safe_dump({2: ["12 + 7 = 19\n45 - 18 = 27\n" * 30]}))  # by index: all four are math
    bars = (is_progress_bar_enabled(), are_progress_bars_disabled())  # transformers' and huggingface_hub's
    assert main(["quality", str(one_expert_moe), str(path)]) == 0
    assert (is_progress_bar_enabled(), are_progress_bars_disabled()) == bars  # as they were, for what runs next
    out, err = capsys.readouterr()
    assert "expert's gain recovered" in out
    assert "Scoring the MoE" in err and "Loading weights" not in err  # the studio names what it loads, once
    assert out.splitlines()[-1].split() == ["math", "390", "2.300", "2.047", "2.047", "100%"]


def test_quality_of_a_folder_without_a_merge_config_is_named(tmp_path):
    assert main(["quality", str(ZOO / "base"), "zoo"]) == 2


def test_merge_reports_quality_in_its_log_and_model_card(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    config = tmp_path / "moe.yml"
    config.write_text(yaml.safe_dump({"base_model": "assets/zoo/base", "gate_mode": "random", "experts": [
        {"source_model": "assets/zoo/math"}, {"source_model": "assets/zoo/stories"}]}))
    texts = tmp_path / "texts.yml"
    texts.write_text(yaml.safe_dump({"math": ["12 + 7 = 19\n45 - 18 = 27\n" * 30], "stories": [STORY]}))
    out = tmp_path / "out"
    assert main(["merge", str(config), str(out), "--quality-text", str(texts), "--random-seed", "0"]) == 0
    card = (out / "README.md").read_text()
    assert "## Quality on held-out text" in card
    rows = [line for line in card.splitlines() if line.startswith("| math ") or line.startswith("| stories ")]
    assert len(rows) == 2
    assert "expert's gain recovered" in capsys.readouterr().err


def test_merge_names_a_bad_texts_file_before_merging(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    texts = tmp_path / "texts.yml"
    texts.write_text("- not a mapping\n")
    out = tmp_path / "out"
    assert main(["merge", "assets/examples/zoo-fragments.yml", str(out), "--quality-text", str(texts)]) == 2
    assert not out.exists()


def test_zoo_text_scores_the_zoo_experts_a_merge_has(tmp_path, monkeypatch):
    """A merge of two of the zoo's experts is scored on their two domains; one with none of them is told so."""
    monkeypatch.chdir(ROOT)
    two = {"base_model": "assets/zoo/base", "gate_mode": "random", "dtype": "bfloat16",
           "experts": [{"source_model": "assets/zoo/stories"}, {"source_model": "assets/zoo/math"}]}
    merge(parse_config(two), tmp_path / "two", MergeOptions(random_seed=0), log=lambda m: None)
    report = measure_quality(tmp_path / "two", "zoo", max_tokens=128, log=lambda m: None)
    assert [(d.expert, d.tokens) for d in report.domains] == [("assets/zoo/math", 128), ("assets/zoo/stories", 128)]
    none = {**two, "experts": [{"source_model": "assets/zoo/base"}, {"source_model": "assets/zoo/base"}]}
    merge(parse_config(none), tmp_path / "none", MergeOptions(random_seed=0, allow_identical_experts=True),
          log=lambda m: None)
    with pytest.raises(StudioError, match="None of the zoo's domain experts .* is in this merge"):
        measure_quality(tmp_path / "none", "zoo", log=lambda m: None)
