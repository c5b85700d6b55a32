"""The workspace's finished merges, the chat model kept in memory, Hub pushes and download progress."""

import logging
from pathlib import Path

import pytest
from tqdm.std import tqdm

from studio.app.hub import files_to_push, push_to_hub
from studio.app.workspace import MERGE_HEADERS, expert_prompts, finished_merges, output_folder
from studio.errors import StudioError
from studio.inspect.loaded import LoadedModel
from studio.sources import progress_tqdm

pytestmark = pytest.mark.usefixtures("single_thread")
SECRET = "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42"


def test_finished_merges_lists_merges_only(zoo_moe, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / ".zoo.partial-1234").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    merges = finished_merges(zoo_moe.parent)
    assert [m.path for m in merges] == [zoo_moe]
    assert merges[0].experts == [f"assets/zoo/{name}" for name in ("code", "math", "stories", "chat")]
    row = merges[0].row()
    assert len(row) == len(MERGE_HEADERS) and row[0] == "zoo-4x" and row[1] == "4" and row[2].endswith("MB")
    assert finished_merges(tmp_path) == [] and finished_merges(tmp_path / "missing") == []


def test_expert_prompts_come_from_the_merge_config(zoo_moe):
    prompts = expert_prompts(zoo_moe)
    assert list(prompts) == [f"assets/zoo/{name}" for name in ("code", "math", "stories", "chat")]
    assert prompts["assets/zoo/stories"][0] == "Once upon a time"
    assert expert_prompts(zoo_moe / "missing") == {}


def test_a_loaded_model_is_reused_until_another_is_asked_for(zoo_moe):
    loaded = LoadedModel("cpu")
    first, fresh = loaded.get(str(zoo_moe), "bf16")
    again, fresh_again = loaded.get(f"{zoo_moe}/", "bf16")
    assert fresh and not fresh_again and again is first
    other, fresh_other = loaded.get(str(zoo_moe), "fp32")
    assert fresh_other and other is not first and other.precision == "fp32"
    with pytest.raises(StudioError):
        loaded.get(str(zoo_moe / "missing"), "bf16")


def test_push_to_an_unreachable_hub_is_a_clear_error_without_the_token(zoo_moe, tmp_path, caplog, capsys):
    logged = []
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StudioError) as info:
        push_to_hub(zoo_moe, "someone/zoo-moe", SECRET, private=True, log=logged.append,
                    endpoint="http://127.0.0.1:9")
    message = str(info.value)
    assert message.startswith("Push to someone/zoo-moe failed") and "network" in message
    assert logged[0] == "Creating private repository someone/zoo-moe"
    out = capsys.readouterr()
    for text in [message, *logged, caplog.text, out.out, out.err]:
        assert SECRET not in text
    written = [p for p in Path.home().joinpath(".cache", "huggingface").rglob("*") if p.is_file()] \
        if Path.home().joinpath(".cache", "huggingface").exists() else []
    assert not any(SECRET in p.read_text(errors="ignore") for p in written if p.stat().st_size < 10**6)


def test_push_checks_its_inputs_before_any_network(zoo_moe, tmp_path):
    files = files_to_push(zoo_moe)
    assert {"README.md", "config.json", "mergekit_moe_config.yml", "model.safetensors"} <= set(files)
    with pytest.raises(StudioError, match="not a finished merge"):
        files_to_push(tmp_path)
    with pytest.raises(StudioError, match="your-name/model-name"):
        push_to_hub(zoo_moe, "no slash", SECRET)
    with pytest.raises(StudioError, match="token"):
        push_to_hub(zoo_moe, "me/model", "  ")


def test_download_progress_reaches_its_callback_and_draws_nothing(capsys):
    seen = []
    bar_class = progress_tqdm(lambda what, done, total: seen.append((what, done, total)))
    assert issubclass(bar_class, tqdm)
    with bar_class(total=3, desc="Fetching 3 files", disable=False) as bar:  # huggingface_hub asks for a bar
        for _ in range(3):
            bar.update(1)
    assert seen == [("Fetching 3 files", n, 3) for n in range(4)]
    seen.clear()
    with bar_class(total=0, desc="Downloading bytes") as bar:  # its size is set once the file's size is known
        bar.total = 10
        bar.update(4)
    assert seen == [("Downloading bytes", 0, 0), ("Downloading bytes", 4, 10)]
    assert capsys.readouterr().err == ""


def test_merges_go_into_the_workspace_under_a_plain_name(tmp_path):
    assert output_folder(tmp_path, " my-moe ") == tmp_path / "my-moe"
    for bad in ["", "../elsewhere", "a/b", ".hidden"]:
        with pytest.raises(StudioError, match="plain folder name"):
            output_folder(tmp_path, bad)
