"""The Build tab's form logic: edits of the config mapping, the YAML written from it, problems by field."""

from pathlib import Path

import pytest
import yaml

from studio.app.form import (add_expert, expert_names, expert_view, field_problems, messages_by_area, move_expert,
                             parse_mapping, prompts_to_text, remove_expert, rewritten_yaml, set_expert_field, set_field,
                             text_to_files, text_to_prompts)
from studio.config import load_yaml, to_yaml
from studio.errors import StudioError

ZOO = (Path(__file__).resolve().parents[1] / "assets" / "examples" / "zoo-4x.yml").read_text()


@pytest.fixture
def zoo() -> dict:
    return parse_mapping(ZOO)


def test_prompts_survive_the_text_box_exactly(zoo):
    for expert in zoo["experts"]:
        assert text_to_prompts(prompts_to_text(expert["positive_prompts"])) == expert["positive_prompts"]
    assert text_to_prompts("one\n---\ntwo\nlines") == ["one", "two\nlines"]
    assert text_to_prompts("  \n") is None


def test_form_edits_show_in_the_yaml_and_back(zoo):
    data = set_expert_field(zoo, 1, "source_model", "assets/zoo/chat")
    data = set_expert_field(data, 1, "positive_prompts", "2 + 2 =\n---\n9 - 3 =")
    data = set_expert_field(data, 1, "noise_scale", 0.01)
    data = set_field(data, "gate_mode", "cheap_embed")
    data = set_field(data, "experts_per_token", 1.0)
    config = load_yaml(to_yaml(data))
    assert config.experts[1].source_model == "assets/zoo/chat"
    assert config.experts[1].positive_prompts == ["2 + 2 =", "9 - 3 ="]
    assert config.experts[1].noise_scale == 0.01
    assert (config.gate_mode, config.experts_per_token) == ("cheap_embed", 1)
    assert zoo["experts"][1]["source_model"] == "assets/zoo/math"  # edits copy; the old mapping is unchanged
    view = expert_view(parse_mapping(to_yaml(data)), 1)
    assert (view.source_model, view.positive_prompts, view.noise_scale) == ("assets/zoo/chat", "2 + 2 =\n---\n9 - 3 =",
                                                                            0.01)
    assert "dtype" not in set_field(zoo, "dtype", None)


def test_calibration_text_files_are_one_per_line(zoo, tmp_path):
    """The expert's `calibration_text` box: one path per line, blank lines and spaces ignored; emptied, the key
    leaves the config; a file that is not there is named next to the expert."""
    texts = [tmp_path / "math one.txt", tmp_path / "math-2.txt"]
    for path in texts:
        path.write_text("12 + 7 = 19\n")
    data = set_field(zoo, "gate_mode", "expert_text")
    data = set_expert_field(data, 1, "calibration_text", f"  {texts[0]}\n\n{texts[1]}  \n")
    config = load_yaml(to_yaml(data))
    assert config.experts[1].calibration_text == [str(texts[0]), str(texts[1])]
    assert expert_view(data, 1).calibration_text == f"{texts[0]}\n{texts[1]}"
    assert field_problems(data) == {}
    missing = set_expert_field(data, 2, "calibration_text", str(tmp_path / "gone.txt"))
    assert "is not a file" in " ".join(field_problems(missing)["experts[2]"])
    assert "calibration_text" not in set_expert_field(data, 1, "calibration_text", " \n")["experts"][1]
    assert text_to_files("a.txt\r\n b.txt") == ["a.txt", "b.txt"] and text_to_files("") is None


def test_experts_are_added_removed_and_reordered(zoo):
    names = [e["source_model"] for e in zoo["experts"]]
    assert expert_names(zoo)[0] == "0: assets/zoo/code"
    moved = move_expert(zoo, 0, +1)
    assert [e["source_model"] for e in moved["experts"]] == [names[1], names[0], *names[2:]]
    assert move_expert(zoo, 0, -1) == zoo
    added = add_expert(zoo)
    assert added["experts"][-1] == {"source_model": "assets/zoo/base"}
    assert [e["source_model"] for e in remove_expert(added, 0)["experts"]] == names[1:] + ["assets/zoo/base"]


def test_shared_expert_appears_and_disappears(zoo):
    data = set_expert_field(zoo, 0, "source_model", "assets/zoo/chat", group="shared_experts")
    assert data["shared_experts"] == [{"source_model": "assets/zoo/chat"}]
    assert "shared_experts" not in set_expert_field(data, 0, "source_model", "", group="shared_experts")
    with pytest.raises(StudioError, match=r"no experts\[7\]"):
        set_expert_field(zoo, 7, "source_model", "x")


def test_problems_land_next_to_their_field(zoo):
    assert field_problems(zoo) == {}
    data = set_expert_field(zoo, 2, "positive_prompts", "")
    data = set_field(data, "experts_per_token", 5)
    problems = field_problems(data)
    assert "no `positive_prompts`" in problems["experts[2]"][0]
    assert "only 4 experts" in problems["experts_per_token"][0]
    areas = messages_by_area(problems, selected=2)
    assert "positive_prompts" in areas["expert"] and "only 4 experts" in areas["settings"]
    assert areas["experts"] == areas["base"] == ""
    assert "experts[2]" in messages_by_area(problems, selected=0)["experts"]  # an expert not on screen

    typo = set_field(set_field(zoo, "gate_mode", "hiden"), "base_model", None)
    problems = field_problems(typo)
    assert "did you mean `hidden`" in problems["gate_mode"][0]
    assert "required" in problems["base_model"][0]
    bad_scale = set_expert_field(zoo, 0, "noise_scale", "lots")
    assert "noise_scale" in field_problems(bad_scale)["experts[0]"][0]


def test_yaml_that_is_no_mapping_is_a_clear_error():
    with pytest.raises(StudioError, match="does not parse"):
        parse_mapping("experts: [")
    with pytest.raises(StudioError, match="must be a mapping"):
        parse_mapping("- a\n- b")
    assert yaml.safe_load(to_yaml(parse_mapping(ZOO))) == parse_mapping(ZOO)


def test_form_edits_keep_the_comment_block_at_the_top_and_say_when_others_go(zoo):
    yaml_text, note = rewritten_yaml(ZOO, set_field(zoo, "gate_mode", "hidden"))
    header = "".join(line for line in ZOO.splitlines(keepends=True) if line.startswith("#"))
    assert yaml_text.startswith(header) and note == ""
    assert parse_mapping(yaml_text) == set_field(zoo, "gate_mode", "hidden")
    inline = ZOO.replace("dtype: bfloat16", "dtype: bfloat16  # half the bytes") + "# the end\n"
    lines = inline.splitlines()
    yaml_text, note = rewritten_yaml(inline, zoo)
    dropped = [lines.index("dtype: bfloat16  # half the bytes") + 1, len(lines)]
    assert note == f"- The form rewrote the YAML: the comments on lines {dropped[0]}, {dropped[1]} were dropped " \
                   f"(the comment block at the top is kept)."
    assert "half the bytes" not in yaml_text and yaml_text.startswith(header)
    quoted = "base_model: a\nexperts:\n  - source_model: b\n    positive_prompts: ['x #1', \"y # 2\"]\n"
    assert rewritten_yaml(quoted, parse_mapping(quoted))[1] == ""  # a # inside quotes is text, not a comment
