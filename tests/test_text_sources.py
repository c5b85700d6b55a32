"""Domain text from local files and from Hub dataset files (studio/text_sources.py), for calibration_text and
quality. The Hub is read through huggingface_hub's own cache, offline: a dataset file placed in the cache's
layout is found by the real hf_hub_download, as a file downloaded earlier would be."""

import json
import sys

import huggingface_hub
import huggingface_hub.constants
import pytest

from studio.build.expert_text import WINDOW, read_calibration_text
from studio.config import check_rules, parse_config
from studio.errors import StudioError
from studio.inspect.quality import load_texts
from studio.text_sources import read_text, source_problem

from conftest import moe_yaml

RECORDS = [{"instruction": "Add 2 and 3.", "output": "2 + 3 = 5", "id": 1},
           {"instruction": "What is 4 times 6?", "output": "4 * 6 = 24", "id": 2}]
ARITHMETIC = [{"instruction": f"Add {i} and {i + 3}.", "output": f"{i} + {i + 3} = {2 * i + 3}"} for i in range(40)]
OUTPUTS = "\n\n".join(record["output"] for record in ARITHMETIC)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hub cache holding dataset `me/arithmetic` (main = COMMIT) with train.jsonl and notes.txt."""
    repo = tmp_path / "hub" / "datasets--me--arithmetic"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    (snapshot / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ARITHMETIC))
    (snapshot / "notes.txt").write_text("12 + 7 = 19\n")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return snapshot


def test_json_lines_give_one_field_or_every_string_of_each_record(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n\n" + json.dumps(RECORDS[1]) + "\n")
    assert read_text(f"{path}#output") == "2 + 3 = 5\n\n4 * 6 = 24"
    assert read_text(str(path)) == "Add 2 and 3.\n2 + 3 = 5\n\nWhat is 4 times 6?\n4 * 6 = 24"  # ids are not text


def test_json_files_hold_a_list_or_an_object_around_one_and_chats_nest(tmp_path):
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}
    (tmp_path / "list.json").write_text(json.dumps(RECORDS))
    (tmp_path / "wrapped.json").write_text(json.dumps({"version": "1", "data": RECORDS}))
    (tmp_path / "chat.json").write_text(json.dumps([chat]))
    assert read_text(str(tmp_path / "list.json") + "#instruction") == "Add 2 and 3.\n\nWhat is 4 times 6?"
    assert read_text(str(tmp_path / "wrapped.json") + "#output") == "2 + 3 = 5\n\n4 * 6 = 24"
    assert read_text(str(tmp_path / "chat.json")) == "user\nHi\nassistant\nHello!"


def test_plain_text_is_read_whole_and_records_stop_at_the_budget(tmp_path):
    (tmp_path / "a#b.txt").write_text("x" * 50)
    assert read_text(str(tmp_path / "a#b.txt")) == "x" * 50  # a '#' outside a JSON name is part of the name
    assert read_text("a#b.txt", relative_to=tmp_path, max_chars=10) == "x" * 10
    (tmp_path / "many.jsonl").write_text("".join(json.dumps({"t": str(i) * 4}) + "\n" for i in range(10)))
    assert read_text(str(tmp_path / "many.jsonl"), max_chars=8) == "0000\n\n11"  # stops within a record


def test_bad_sources_say_what_is_wrong(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps(RECORDS[0]) + "\n{oops\n")
    with pytest.raises(StudioError, match=r"bad.jsonl: line 2 is not valid JSON"):
        read_text(str(tmp_path / "bad.jsonl"))
    with pytest.raises(StudioError, match=r"record 1 has no field 'text' \(its fields: id, instruction, output\)"):
        read_text(str(tmp_path / "bad.jsonl") + "#text")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(StudioError, match=r"cannot read .*latin1.txt .*give UTF-8 text, JSON, JSON Lines or Parq"):
        read_text(str(tmp_path / "latin1.txt"))
    assert source_problem(str(tmp_path / "gone.txt")).endswith("gone.txt is not a file")
    assert "an Arrow file" in source_problem("hf://datasets/me/arithmetic/cache-1234.arrow")
    assert "Repository id must be 'namespace/name'" in source_problem("hf://datasets/arithmetic.jsonl")
    assert "Cannot have -- or .." in source_problem("hf://datasets/me/x--y/a.jsonl")
    assert "not a file of a Hub dataset" in source_problem("hf://me/a-model/notes.txt")  # a model repo
    assert "not a file of a Hub dataset" in source_problem("hf://datasets/me/arithmetic")  # no file named
    assert "#text picks a field" in source_problem("hf://datasets/me/arithmetic/notes.txt#text")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"id": 1, "text": ""}) + "\n" + json.dumps({"id": 2}) + "\n")
    with pytest.raises(StudioError, match=r"empty.jsonl: no record has text$"):
        read_text(str(tmp_path / "empty.jsonl"))
    (tmp_path / "ids.json").write_text(json.dumps({"tags": ["a"], "rows": [{"id": 1}, {"id": 2}]}))
    with pytest.raises(StudioError, match=r"ids.json: no record has text in field 'id'"):
        read_text(str(tmp_path / "ids.json") + "#id")  # the records, not the tags; and numbers are not text
    assert source_problem("hf://datasets/me/arithmetic@v1.0/train.jsonl#output") is None  # nothing downloaded
    assert source_problem("hf://datasets/me/arithmetic@refs/convert/parquet/default/train/0000.parquet") is None


def test_hub_dataset_files_are_read_through_the_hub_cache(hub_cache):
    assert read_text("hf://datasets/me/arithmetic/train.jsonl#output") == OUTPUTS
    assert read_text(f"hf://datasets/me/arithmetic@{COMMIT}/notes.txt") == "12 + 7 = 19\n"
    assert read_text("https://huggingface.co/datasets/me/arithmetic/blob/main/notes.txt") == "12 + 7 = 19\n"
    with pytest.raises(StudioError, match=r"^hf://datasets/me/arithmetic/test.jsonl: file 'test.jsonl' of dataset "
                                          r"'me/arithmetic' is not in the local Hub cache.*HF_HUB_OFFLINE=1"):
        read_text("hf://datasets/me/arithmetic/test.jsonl")


def test_calibration_text_from_a_hub_dataset_is_checked_then_read_as_a_local_file_is(mistral, hub_cache, tokenizer,
                                                                                      tmp_path):
    base, experts = mistral
    data = moe_yaml(base, experts, gate_mode="expert_text")
    data["experts"][0]["calibration_text"] = ["hf://datasets/me/arithmetic/train.jsonl#output"]
    data["experts"][1]["calibration_text"] = [str(hub_cache / "train.jsonl") + "#output"]
    data["experts"][2]["calibration_text"] = ["hf://datasets/me/arithmetic/data.arrow"]
    errors, _ = check_rules(parse_config(data))
    assert errors == ["`experts[2].calibration_text` (" + str(experts[2]) + "): hf://datasets/me/arithmetic/"
                      "data.arrow is an Arrow file, which the studio does not read: give the dataset's .parquet "
                      "or .jsonl file. Give text files of this expert's domain (UTF-8 text, JSON Lines, JSON or "
                      "Parquet), local or hf://datasets/OWNER/NAME/FILE."]
    config = parse_config(data)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    bos = [tokenizer.bos_token_id]
    from_hub = read_calibration_text(config.experts[0], 0, encode, bos)
    assert from_hub == read_calibration_text(config.experts[1], 1, encode, bos)
    ids = encode(OUTPUTS)
    assert from_hub == [bos + ids[start:start + WINDOW] for start in range(0, len(ids), WINDOW)] and len(ids) > 64
    config.experts[3].calibration_text = ["hf://datasets/me/arithmetic/missing.jsonl"]
    with pytest.raises(StudioError, match=r"`experts\[3\].calibration_text` \(.*\): hf://datasets/me/arithmetic/"
                                          r"missing.jsonl: file 'missing.jsonl' of dataset 'me/arithmetic' is "
                                          r"not in the local Hub cache"):
        read_calibration_text(config.experts[3], 3, encode, bos)


def test_quality_texts_read_files_relative_to_their_yaml_and_from_hub_datasets(hub_cache, tmp_path):
    (tmp_path / "stories.txt").write_text("Once upon a time.")
    texts = tmp_path / "texts.yml"
    texts.write_text("0: [{file: stories.txt}, 'The end.']\n"
                     "1:\n  - file: hf://datasets/me/arithmetic/train.jsonl#output\n")
    assert load_texts(texts) == {0: "Once upon a time.\n\nThe end.", 1: OUTPUTS}
    texts.write_text("1: [{file: hf://datasets/me/arithmetic/train.jsonl#answer}]\n")
    with pytest.raises(StudioError, match=r"Texts for 1: .*record 1 has no field 'answer'"):
        load_texts(texts)


def test_parquet_rows_are_records_and_without_pyarrow_the_file_is_named(hub_cache, monkeypatch):
    import pyarrow
    import pyarrow.parquet

    chats = [[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]] * 3
    table = pyarrow.table({"output": [r["output"] for r in ARITHMETIC], "id": list(range(40)),
                           "messages": chats + [[]] * 37})
    pyarrow.parquet.write_table(table, hub_cache / "train.parquet", row_group_size=7)  # rows span row groups
    assert read_text("hf://datasets/me/arithmetic/train.parquet#output") == OUTPUTS
    assert read_text("hf://datasets/me/arithmetic/train.parquet").startswith(
        "0 + 3 = 3\nuser\nHi\nassistant\nHello!\n\n1 + 4 = 5\nuser")  # every string of a row, in order
    assert read_text("hf://datasets/me/arithmetic/train.parquet#output", max_chars=15) == "0 + 3 = 3\n\n1 + "
    with pytest.raises(StudioError, match=r"train.parquet has no column 'text' \(its columns: output, id, messages\)"):
        read_text("hf://datasets/me/arithmetic/train.parquet#text")
    (hub_cache / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(StudioError, match=r"broken.parquet is not a readable Parquet file"):
        read_text("hf://datasets/me/arithmetic/broken.parquet")

    monkeypatch.setitem(sys.modules, "pyarrow", None)  # a machine without pyarrow
    problem = source_problem("hf://datasets/me/arithmetic/train.parquet#output")
    assert problem == ("hf://datasets/me/arithmetic/train.parquet#output is Parquet, which needs pyarrow: `pip install "
                       "pyarrow` (the studio does not install it), or give the dataset's .jsonl or .json file")
    with pytest.raises(StudioError, match="needs pyarrow"):
        read_text("hf://datasets/me/arithmetic/train.parquet")
