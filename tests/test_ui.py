"""The studio in a real browser: Chromium driven by Playwright against the real Gradio server and real models.

Each tab is saved as a screenshot into assets/screenshots (README shows them).
"""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from playwright.sync_api import Page, expect

from studio.app.jobs import MergeRunner
from studio.app.ui.app import build_app, launch
from studio.build.merge import merge
from studio.build.preview import preview_routing, summary_rows
from studio.config import load_config, parse_config
from studio.inspect.chat import load_chat_model
from studio.inspect.settings import ChatSettings
from studio.inspect.quality import measure_quality

ROOT = Path(__file__).resolve().parents[1]
SHOTS = ROOT / "assets" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
# Without the background-networking flags Chromium keeps calling home, which floods a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SLOW = 120_000  # ms: a merge or a model load on a busy 2-core machine


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"The browser tests need Debian's Chromium at {CHROMIUM}: apt-get install -y chromium "
                    f"(.ci/run does this).")
    return {**browser_type_launch_args, "executable_path": CHROMIUM, "args": CHROMIUM_ARGS}


@pytest.fixture(scope="session")
def browser_context_args(browser_context_args):
    return {**browser_context_args, "viewport": {"width": 1440, "height": 900}}


STUDIO_FOLDER: list[Path] = []  # the workspace of the session's studio


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def studio(tmp_path_factory):
    """The studio serving a fresh workspace that already holds one merge of the zoo (for the Chat tab)."""
    workspace = tmp_path_factory.mktemp("studio") / "workspace"
    workspace.mkdir()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # the presets' zoo paths are relative to the project folder, as with `python app.py`
        merge(load_config(ROOT / "assets" / "examples" / "zoo-4x.yml"), workspace / "zoo-4x", log=lambda m: None)
        runner = MergeRunner()
        STUDIO_FOLDER[:] = [workspace]
        app = build_app(workspace, device="cpu", runner=runner)
        port = free_port()
        launch(app, server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
        yield f"http://127.0.0.1:{port}/", workspace, runner
        app.close()


@pytest.fixture
def page_at(page: Page, studio) -> Page:
    page.set_default_timeout(30_000)
    page.goto(studio[0])
    expect(page.locator("#base-model textarea, #base-model input")).to_have_value("assets/zoo/base")
    return page


# CodeMirror renders only the lines near the view, so the whole text is read from the editor's state.
EDITOR_TEXT = "() => document.querySelector('#config-yaml .cm-content').cmTile.view.state.doc.toString()"


def editor_yaml(page: Page) -> dict:
    return yaml.safe_load(page.evaluate(EDITOR_TEXT))


def wait_for_yaml(page: Page, check, timeout: float = 10) -> dict:
    """The editor's YAML once `check(data)` holds (form edits reach the editor after a round trip)."""
    for _ in range(int(timeout * 10)):
        data = editor_yaml(page)
        if check(data):
            return data
        page.wait_for_timeout(100)
    raise AssertionError(f"The YAML editor never satisfied the check; it holds:\n{data}")


def replace_editor_text(page: Page, text: str) -> None:
    page.locator("#config-yaml .cm-content").click()
    page.keyboard.press("ControlOrMeta+a")
    page.keyboard.insert_text(text)


def field(page: Page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def type_into(page: Page, elem_id: str, text: str) -> None:
    """Replace a field's text the way a person does: Gradio's input events follow key presses, not fill()."""
    box = field(page, elem_id)
    box.fill(text[:-1])
    box.press_sequentially(text[-1])


def retype_until_shown(page: Page, elem_id: str, text: str, tries: int = 3) -> None:
    """type_into until the field shows `text`: a panel that is still rendering can put its default value back
    over the first typing (a person would type it again)."""
    for attempt in range(tries):
        type_into(page, elem_id, text)
        try:
            expect(field(page, elem_id)).to_have_value(text, timeout=5_000)
            return
        except AssertionError:
            if attempt == tries - 1:
                raise


def set_slider(page: Page, elem_id: str, value: str) -> None:
    """Type a slider's value into its number box until the slider shows it. On a busy machine the box can miss
    the first Enter while the page is still busy (a person would type it again)."""
    number, slider = page.locator(f"#{elem_id} input[type=number]"), page.locator(f"#{elem_id} input[type=range]")
    for _ in range(4):
        number.fill(value)
        number.press("Enter")
        if slider.input_value() == value:
            return
        page.wait_for_timeout(500)
    expect(slider).to_have_value(value)


# The page as a person who keeps the studio in ~/moe-studio sees it: the test's temporary folder is not shown.
SHOWN_FOLDER = """([folder, shown]) => {
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  while (walker.nextNode()) walker.currentNode.nodeValue = walker.currentNode.nodeValue.replaceAll(folder, shown);
  for (const box of document.querySelectorAll('input, textarea')) box.value = box.value.replaceAll(folder, shown);
}"""


def wait_for_exact_text(page: Page, selector: str, text: str, timeout: float = SLOW / 1000) -> None:
    """Until the last element matching `selector` shows exactly `text`, whitespace included (Playwright's
    to_have_text would forgive lost indentation)."""
    shown = None
    for _ in range(int(timeout * 10)):
        elements = page.locator(selector)
        shown = elements.last.inner_text() if elements.count() else None
        if shown == text:
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"{selector} shows {shown!r}, not {text!r}")


def watch_texts(page: Page, elem_id: str) -> None:
    """Record every text an element shows from now on (read back with seen_texts): a state that lasts less than
    a poll is caught too."""
    page.evaluate("""(id) => {
      const element = document.getElementById(id);
      window.__seen = window.__seen || {};
      window.__seen[id] = [element.innerText];
      new MutationObserver(() => window.__seen[id].push(element.innerText))
        .observe(element, {subtree: true, childList: true, characterData: true, attributes: true});
    }""", elem_id)


def seen_texts(page: Page, elem_id: str) -> list[str]:
    return page.evaluate("(id) => window.__seen[id]", elem_id)


def send_and_wait(page: Page, text: str, answers: int = 1) -> None:
    """Send a chat message and wait until `answers` replies have begun and the last has ended (the status of the
    reply before says "Answer:" too, so the statuses shown meanwhile are recorded)."""
    watch_texts(page, "chat-status")
    field(page, "chat-input").fill(text)
    field(page, "chat-input").press("Enter")
    for _ in range(SLOW // 100):
        seen = seen_texts(page, "chat-status")
        began = sum(1 for before, now in zip(seen, seen[1:]) if "Answering" in now and "Answering" not in before)
        if began >= answers and "Answer:" in seen[-1]:
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"No answer to {text!r}; the status showed {seen_texts(page, 'chat-status')[-3:]}")


def screenshot(page: Page, name: str) -> None:
    """A full-page PNG, reduced to 256 colours so the repository stays small."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.evaluate(SHOWN_FOLDER, [str(STUDIO_FOLDER[0].parent), "~/moe-studio"])
    path = SHOTS / f"{name}.png"
    page.screenshot(path=path, full_page=True)
    Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def test_page_opens_with_the_zoo_config(page_at: Page):
    data = editor_yaml(page_at)
    assert data["base_model"] == "assets/zoo/base" and len(data["experts"]) == 4
    expect(field(page_at, "expert-picker")).to_have_value("0: assets/zoo/code")
    expect(field(page_at, "expert-source")).to_have_value("assets/zoo/code")
    expect(field(page_at, "gate-mode")).to_have_value("expert_text")
    expect(page_at.locator("#finished-merges")).to_contain_text("zoo-4x")


def test_form_edits_change_the_yaml_and_yaml_edits_change_the_form(page_at: Page):
    type_into(page_at, "expert-source", "assets/zoo/stories")
    data = wait_for_yaml(page_at, lambda d: d["experts"][0]["source_model"] != "assets/zoo/code")
    assert [e["source_model"] for e in data["experts"]] == ["assets/zoo/stories", "assets/zoo/math",
                                                            "assets/zoo/stories", "assets/zoo/chat"]
    expect(field(page_at, "expert-picker")).to_have_value("0: assets/zoo/stories")

    type_into(page_at, "expert-calibration", "/no/such/stories.txt")
    data = wait_for_yaml(page_at, lambda d: d["experts"][0].get("calibration_text") == ["/no/such/stories.txt"])
    expect(page_at.locator("#msg-expert")).to_contain_text("/no/such/stories.txt is not a file")

    data["gate_mode"] = "cheap_embed"
    data["experts"][0]["source_model"] = "assets/zoo/math"
    data["experts"][0]["positive_prompts"] = ["first prompt", "second\nprompt"]
    data["experts"][0]["calibration_text"] = ["a.txt", "b.txt"]
    replace_editor_text(page_at, yaml.safe_dump(data, sort_keys=False))
    expect(field(page_at, "gate-mode")).to_have_value("cheap_embed")
    expect(field(page_at, "expert-source")).to_have_value("assets/zoo/math")
    expect(field(page_at, "expert-positive")).to_have_value("first prompt\n---\nsecond\nprompt")
    expect(field(page_at, "expert-calibration")).to_have_value("a.txt\nb.txt")
    del data["experts"][0]["calibration_text"]
    replace_editor_text(page_at, yaml.safe_dump(data, sort_keys=False))
    expect(field(page_at, "expert-calibration")).to_have_value("")

    page_at.locator("#add-expert").click()
    expect(field(page_at, "expert-picker")).to_have_value("4: assets/zoo/base")
    wait_for_yaml(page_at, lambda d: d["experts"][4:] == [{"source_model": "assets/zoo/base"}])
    expect(page_at.locator("#msg-expert")).to_contain_text("has no positive_prompts")

    with page_at.expect_download() as download:
        page_at.locator("#download-yaml").click()
    assert yaml.safe_load(Path(download.value.path()).read_text()) == editor_yaml(page_at)


def test_invalid_config_shows_its_message_next_to_the_field(page_at: Page, tmp_path):
    type_into(page_at, "experts-per-token", "9")
    expect(page_at.locator("#msg-settings")).to_contain_text("experts_per_token is 9 but there are only 4 experts")
    wait_for_yaml(page_at, lambda d: d["experts_per_token"] == 9)

    text = page_at.evaluate(EDITOR_TEXT)
    replace_editor_text(page_at, text.replace("gate_mode: expert_text", "gate_mode: expert_txt"))
    expect(page_at.locator("#msg-settings")).to_contain_text("did you mean expert_text")
    replace_editor_text(page_at, "experts: [")
    expect(page_at.locator("#msg-config")).to_contain_text("The YAML does not parse")
    expect(field(page_at, "base-model")).to_have_value("assets/zoo/base")  # the form keeps its last good values

    page_at.locator("#merge-button").click()
    expect(page_at.locator("#merge-status")).to_contain_text("not valid YAML")
    expect(page_at.locator("body")).not_to_contain_text("Traceback")

    uploaded = tmp_path / "mine.yml"
    uploaded.write_text("base_model: assets/zoo/base\nexperts:\n  - source_model: assets/zoo/code\n    noise: 0.1\n")
    with page_at.expect_file_chooser() as chooser:
        page_at.locator("#upload-yaml").click()
    chooser.value.set_files(uploaded)
    expect(page_at.locator("#msg-expert")).to_contain_text("experts[0].noise: unknown key (did you mean noise_scale?)")
    expect(page_at.locator("#config-yaml")).to_contain_text("noise: 0.1")


def test_check_models_and_merge_by_clicking(page_at: Page, studio):
    workspace = studio[1]
    page_at.locator("#check-models").click()
    expect(page_at.locator("#check-message")).to_contain_text("Models fit together.")
    expect(page_at.locator("#compat-table")).to_contain_text("experts[3]")
    expect(page_at.locator("#estimates")).to_contain_text("memory to run, 4-bit")
    field(page_at, "out-name").fill("clicked-moe")
    page_at.locator("#merge-button").click()
    expect(page_at.locator("#merge-progress .studio-progress")).to_have_attribute("data-fraction", "1.000",
                                                                                timeout=SLOW)
    expect(page_at.locator("#merge-status")).to_contain_text(f"Done: {workspace / 'clicked-moe'}")
    expect(page_at.locator("#merge-progress .studio-progress")).to_have_attribute("data-state", "done")
    expect(field(page_at, "merge-log")).to_have_value(re.compile(r"Wrote 8 files"))
    expect(page_at.locator("#finished-merges")).to_contain_text("clicked-moe")
    assert (workspace / "clicked-moe" / "model.safetensors").is_file()
    assert load_config(workspace / "clicked-moe" / "mergekit_moe_config.yml") == \
        load_config(ROOT / "assets" / "examples" / "zoo-4x.yml")
    screenshot(page_at, "build")


def test_preview_shows_the_routing_before_merging(page_at: Page):
    prompts = ["35 - 25 = 10", "Once upon a time there was a fox"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        expected = preview_routing(load_config(ROOT / "assets" / "examples" / "zoo-4x.yml"), prompts,
                                   log=lambda m: None)
    page_at.get_by_text("Preview routing before merging").click()
    box = field(page_at, "preview-prompts")
    expect(box).to_have_value(re.compile("^def add"))  # the opened panel's default prompts are in place
    retype_until_shown(page_at, "preview-prompts", "\n---\n".join(prompts))
    page_at.locator("#preview-button").click()
    expect(page_at.locator("#preview-message")).to_contain_text("Preview of expert_text gates for 2 prompt(s)",
                                                                timeout=SLOW)
    table = page_at.locator("#preview-table")
    for row in summary_rows(prompts, expected):
        for cell in row:
            expect(table).to_contain_text(cell)
    shown = read_plot(page_at, "preview-figure")
    for z, trace in zip(shown, expected):
        assert torch.allclose(torch.tensor(z, dtype=torch.float32), trace.mean_probabilities("prompt"), atol=1e-6)


def test_merges_queue_and_the_page_stays_responsive(page_at: Page, studio):
    workspace, runner = studio[1], studio[2]
    data = yaml.safe_load((ROOT / "assets" / "examples" / "zoo-4x.yml").read_text())
    data["gate_mode"] = "hidden"
    for expert in data["experts"]:  # thousands of distinct prompts: a hidden-gate pass of minutes
        expert["positive_prompts"] = [f"{p} #{i}" for i in range(800) for p in expert["positive_prompts"]]
    busy = runner.start(parse_config(data), workspace / "long-merge")
    labels = []
    while not busy.bar.label.startswith("Hidden states of the prompts: layer"):  # counted layer by layer
        labels.append(busy.bar.label)
        assert busy.bar.fraction < 0.9 and len(labels) < 1200, labels[-3:]  # far from full: the routers are missing
        page_at.wait_for_timeout(100)
    assert "Router pass: preparing" in labels[-1]
    field(page_at, "out-name").fill("queued-moe")
    page_at.locator("#merge-button").click()
    expect(page_at.locator("#merge-status")).to_contain_text("Queued: waiting for the merge before it")
    expect(field(page_at, "merge-log")).to_have_value(re.compile("Another merge is running; this one starts when"))
    type_into(page_at, "base-model", "assets/zoo/code")  # the form and the YAML still answer
    wait_for_yaml(page_at, lambda d: d["base_model"] == "assets/zoo/code")
    assert not busy.finished.is_set()

    page_at.locator("#cancel-button").click()
    busy.cancel()
    expect(page_at.locator("#merge-status")).to_contain_text("Cancelled.", timeout=SLOW)
    assert busy.finished.wait(60) and busy.state == "cancelled"
    expect(page_at.locator("#merge-progress .studio-progress")).to_have_attribute("data-state", "cancelled")
    assert float(page_at.locator("#merge-progress .studio-progress").get_attribute("data-fraction")) < 1
    assert not (workspace / "long-merge").exists() and not (workspace / "queued-moe").exists()


def read_plot(page: Page, elem_id: str) -> list:
    plot = page.locator(f"#{elem_id} .js-plotly-plot")
    expect(plot).to_have_count(1, timeout=SLOW)
    return page.evaluate(f"() => document.querySelector('#{elem_id} .js-plotly-plot').data.map(t => t.z)")


def test_chat_streams_and_shows_the_routing_of_the_reply(page_at: Page, studio):
    model = str(studio[1] / "zoo-4x")
    page_at.locator("#tab-chat-button, button[role=tab]:has-text('Chat')").first.click()
    picker = field(page_at, "chat-model")
    expect(picker).to_have_value(re.compile(r"/workspace/"))  # the tab has listed the merges: typing now stays
    picker.fill(str(studio[1] / "missing"))
    picker.press("Enter")
    field(page_at, "chat-input").fill("Hello")
    field(page_at, "chat-input").press("Enter")
    expect(page_at.locator("#chat-status")).to_contain_text("Error:")
    expect(page_at.locator("body")).not_to_contain_text("Traceback")
    expect(field(page_at, "chat-input")).to_have_value("Hello")  # the message that failed is kept to send again
    page_at.locator("#chat-clear").click()
    picker.fill(model)
    picker.press("Enter")
    page_at.locator("#chat-load").click()
    expect(page_at.locator("#chat-loaded")).to_contain_text("Loaded now:", timeout=SLOW)
    expect(page_at.locator("#chat-layer input[type=range]")).to_have_attribute("max", "3")  # the zoo's 4 layers
    page_at.get_by_text("Generation settings").click()
    expect(page_at.locator("#chat-settings-note")).to_contain_text(
        "greedy, at most 32 new tokens, from the model's generation_config.json")
    expect(page_at.locator("#chat-temperature input[type=range]")).to_have_value("0")
    set_slider(page_at, "chat-max-new", "12")
    field(page_at, "chat-input").fill("Once upon a time")
    field(page_at, "chat-input").press("Enter")
    expect(page_at.locator("#chat-status")).to_contain_text("Answer:", timeout=SLOW)
    shown = read_plot(page_at, "chat-heatmap")[0]

    outside = load_chat_model(model, "4bit", "cpu").reply([{"role": "user", "content": "Once upon a time"}],
                                                          ChatSettings(temperature=0, max_new_tokens=12))
    expected = outside.trace.mean_probabilities("answer").tolist()
    assert len(shown) == len(expected) == 4 and len(shown[0]) == 4
    for row, want in zip(shown, expected):
        assert row == pytest.approx(want, abs=1e-6)
    expect(page_at.locator("#chatbot")).to_contain_text(outside.text.strip()[:20])
    expect(page_at.locator("#chat-tokens")).to_contain_text("Layer 3")

    page_at.locator("#chat-layer input[type=number]").fill("0")
    page_at.locator("#chat-layer input[type=number]").press("Enter")
    expect(page_at.locator("#chat-layer input[type=range]")).to_have_value("0")
    expect(page_at.locator("#chat-tokens")).to_contain_text("Layer 0")
    send_and_wait(page_at, "And then?")
    expect(page_at.locator("#chat-status")).to_contain_text("Reusing")

    page_at.locator("#chat-raw input").check()
    field(page_at, "chat-input").fill("def parse(line):")
    field(page_at, "chat-input").press("Enter")
    zoo = load_chat_model(model, "4bit", "cpu")
    raw = zoo.reply("def parse(line):", ChatSettings(temperature=0, max_new_tokens=12))
    wait_for_exact_text(page_at, "#chatbot .message-content", raw.text)  # as written, not as Markdown

    # For the screenshot: the zoo in each of its domains at its own defaults (a question in the chat template,
    # then a story and code continued as plain text).
    page_at.locator("#chat-clear").click()
    set_slider(page_at, "chat-max-new", "32")
    page_at.locator("#chat-raw input").uncheck()
    send_and_wait(page_at, "What is the capital of France?")
    page_at.locator("#chat-raw input").check()
    for text in ("Once upon a time", "def parse(line):"):
        send_and_wait(page_at, text)
    wait_for_exact_text(page_at, "#chatbot .message-content", zoo.reply("def parse(line):", zoo.defaults).text)
    expect(page_at.locator("#chat-status")).to_contain_text("Answer: 32 tokens", timeout=SLOW)
    screenshot(page_at, "chat")


def test_chat_keeps_code_as_written_stops_and_keeps_what_is_typed_meanwhile(page_at: Page, studio):
    page_at.locator("button[role=tab]:has-text('Chat')").first.click()
    field(page_at, "chat-model").fill(str(studio[1] / "zoo-4x"))
    field(page_at, "chat-model").press("Enter")
    page_at.locator("#chat-raw input").check()
    code = "class Stack:\n    def __init__(self, level):\n        self.__s__ = _x_"
    field(page_at, "chat-input").fill(code)
    field(page_at, "chat-input").press("Enter")
    wait_for_exact_text(page_at, "#chatbot .user .message-content", code)  # indented, no bold, no italics
    expect(page_at.locator("#chat-status")).to_contain_text("Answer:", timeout=SLOW)

    page_at.get_by_text("Generation settings").click()
    set_slider(page_at, "chat-max-new", "2000")  # a reply that would run for minutes
    field(page_at, "chat-input").fill("Once upon a time")
    field(page_at, "chat-input").press("Enter")
    expect(page_at.locator("#chat-status")).to_contain_text("Answering", timeout=SLOW)
    expect(page_at.locator("#chat-heatmap .js-plotly-plot")).to_have_count(1, timeout=SLOW)  # routing while streaming
    queued = "def typed_while_it_streams(self):"  # code: the zoo continues it for long, so Stop has time to end it
    field(page_at, "chat-input").fill(queued)
    field(page_at, "chat-input").press("Enter")
    expect(page_at.locator("#chat-status")).to_contain_text("Queued: 1 message, answered when the current reply ends")
    expect(page_at.locator("#chatbot")).to_contain_text(queued)
    page_at.locator("#chat-stop").click()
    expect(page_at.locator("#chat-status")).not_to_contain_text("Queued", timeout=SLOW)  # now the queued one
    expect(page_at.locator("#chat-status")).to_contain_text("Answering")
    page_at.locator("#chat-stop").click()
    expect(page_at.locator("#chat-status")).to_contain_text("Stopped after", timeout=SLOW)
    page_at.wait_for_timeout(1000)  # the queued event of the second message comes, finds nothing left, changes nothing
    tokens = int(re.search(r"Stopped after (\d+) tokens", page_at.locator("#chat-status").inner_text()).group(1))
    assert tokens < 2000
    users = page_at.locator("#chatbot .user .message-content").all_inner_texts()
    assert users[-2:] == ["Once upon a time", queued]


def test_inspect_compares_prompts_and_evaluates_routing(page_at: Page, studio):
    model = str(studio[1] / "zoo-4x")
    page_at.locator("button[role=tab]:has-text('Inspect')").first.click()
    picker = field(page_at, "inspect-model")
    picker.fill(model)
    picker.press("Enter")
    page_at.locator("#inspect-expert-prompts").click()
    expect(field(page_at, "inspect-prompts")).to_have_value(re.compile(r"^def add\(a, b\):\n    return a \+ b\n---\n"))
    field(page_at, "inspect-prompts").fill("import os\n---\n12 + 7 =\n---\nOnce upon a time")
    page_at.locator("#inspect-compare-button").click()
    expect(page_at.locator("#inspect-status")).to_contain_text("Compared 3 prompts", timeout=SLOW)
    assert len(read_plot(page_at, "inspect-compare")) == 3
    expect(page_at.locator("#inspect-tokens")).not_to_contain_text("Answer")  # routing only: nothing generated
    expect(page_at.locator("#inspect-loaded")).to_contain_text("Loaded now:")
    watch_texts(page_at, "inspect-status")
    page_at.locator("#inspect-evaluate").click()
    expect(page_at.locator("#inspect-status")).to_contain_text("routed to their expert", timeout=SLOW)
    shown = seen_texts(page_at, "inspect-status")
    assert any(re.search(r"Routing held-out prompts: \d+ of 100", text) for text in shown), shown
    confusion = read_plot(page_at, "inspect-confusion")[0]
    prompts = yaml.safe_load((ROOT / "assets" / "zoo" / "eval-prompts.yml").read_text())
    assert [sum(row) for row in confusion] == [len(v) * 4 for v in prompts.values()]  # every (prompt, layer) pair
    expect(page_at.locator("#inspect-table")).to_contain_text("Confusion over (prompt, layer) pairs")

    page_at.locator("#inspect-quality").click()
    expect(page_at.locator("#inspect-status")).to_contain_text("Share of each expert's gain", timeout=SLOW)
    plot = page_at.locator("#inspect-quality-figure .js-plotly-plot")
    expect(plot).to_have_count(1, timeout=SLOW)
    bars = page_at.evaluate("() => document.querySelector('#inspect-quality-figure .js-plotly-plot').data"
                            ".map(t => [t.name, t.y])")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)  # the merge config's zoo paths are relative to the project folder
        expected = measure_quality(model, "zoo", log=lambda m: None)
    assert dict(bars) == {"base": [d.base for d in expected.domains], "MoE": [d.moe for d in expected.domains],
                          "expert alone": [d.expert_alone for d in expected.domains]}
    screenshot(page_at, "inspect")


def test_push_to_hub_fails_readably_and_never_shows_the_token(page_at: Page, capfd):
    secret = "hf_NotARealTokenForTheBrowserTest0123"
    page_at.get_by_text("Push a merge to the Hugging Face Hub").click()
    expect(field(page_at, "push-merge")).to_have_value(re.compile(r"/(zoo-4x|clicked-moe)$"))  # the newest merge
    field(page_at, "push-repo").fill("someone/zoo-moe")
    field(page_at, "push-token").fill(secret)
    page_at.locator("#push-button").click()
    expect(page_at.locator("#push-message")).to_contain_text("Push to someone/zoo-moe failed", timeout=SLOW)
    expect(page_at.locator("#push-message")).to_contain_text("Creating private repository someone/zoo-moe")
    assert secret not in page_at.locator("body").inner_text()
    out = capfd.readouterr()
    assert secret not in out.out and secret not in out.err


def test_a_hidden_gate_merge_shows_its_stages_and_a_stale_error_goes(page_at: Page, studio):
    workspace = studio[1]
    preset = (ROOT / "assets" / "examples" / "zoo-4x.yml").read_text()
    header = "".join(line for line in preset.splitlines(keepends=True) if line.startswith("#"))
    data = yaml.safe_load(preset)
    data["gate_mode"] = "hidden"
    for expert in data["experts"]:  # enough prompts for a hidden-state pass of some seconds
        expert["positive_prompts"] = [f"{p} #{i}" for i in range(40) for p in expert["positive_prompts"]]
    replace_editor_text(page_at, header + yaml.safe_dump(data, sort_keys=False))
    expect(field(page_at, "gate-mode")).to_have_value("hidden")
    type_into(page_at, "base-model", "assets/zoo/nowhere")
    wait_for_yaml(page_at, lambda d: d["base_model"] == "assets/zoo/nowhere")
    page_at.locator("#check-models").click()
    expect(page_at.locator("#check-message")).to_contain_text("Error:")
    type_into(page_at, "base-model", "assets/zoo/base")
    wait_for_yaml(page_at, lambda d: d["gate_mode"] == "hidden" and d["base_model"] == "assets/zoo/base")
    assert page_at.evaluate(EDITOR_TEXT).startswith(header)  # the form edit kept the comment block at the top
    field(page_at, "out-name").fill("hidden-moe")
    page_at.locator("#merge-button").click()
    expect(page_at.locator("#check-message")).to_have_text("")  # the old error belonged to the last check
    bar = page_at.locator("#merge-progress .studio-progress")
    seen = []
    while True:  # state, fraction and label read at once: read one by one, they may come from two renders
        state, fraction, label = bar.evaluate("e => [e.dataset.state, e.dataset.fraction, e.innerText]")
        if state == "done":
            break
        if state == "running":
            seen.append((float(fraction), label))
        assert len(seen) < 1200, seen[-3:]
        page_at.wait_for_timeout(100)
    assert all(fraction < 1 for fraction, _ in seen), seen  # full only once it is done
    assert not any("write 100%" in label for _, label in seen), seen
    hidden = [(fraction, label) for fraction, label in seen if "Hidden states of the prompts: layer" in label]
    assert hidden and all(fraction < 0.9 for fraction, _ in hidden), seen  # the pass is counted, the bar not full
    expect(bar).to_contain_text("Done in")
    assert (workspace / "hidden-moe" / "model.safetensors").is_file()
