import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from studio.app.cli import parse_size

from conftest import moe_yaml
from helpers import ALPHABETS, domain_text

ROOT = Path(__file__).parent.parent


def studio(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "studio", *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=300)


def test_sizes_follow_mergekit_and_binary_units():
    assert parse_size("5B") == 5_000_000_000
    assert parse_size("500M") == 500_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1.5G") == 1_500_000_000
    assert parse_size("4096") == 4096


def test_merge_with_guide_flags_then_refuse_to_overwrite(mistral, write_config, tmp_path):
    base, experts = mistral
    config = write_config(moe_yaml(base, experts, gate_mode="cheap_embed"))
    out = tmp_path / "out"
    done = studio("merge", config, out, "--allow-crimes", "--lazy-unpickle", "--out-shard-size", "200K",
                  "--random-seed", "1", "--copy-tokenizer")
    assert done.returncode == 0, done.stderr
    assert "Note: --allow-crimes is accepted for mergekit compatibility and does nothing here" in done.stderr
    assert "Note: --lazy-unpickle" in done.stderr
    assert (out / "model.safetensors.index.json").exists() and (out / "tokenizer.json").exists()

    again = studio("merge", config, out)
    assert again.returncode == 2
    assert "already exists and is not empty" in again.stderr and "Traceback" not in again.stderr


def studio_on_a_terminal(*args: str) -> tuple[int, str]:
    """`python -m studio` with stderr on a pseudo-terminal, as in a shell: (exit code, what the terminal shows)."""
    import fcntl
    import pty
    import struct
    import termios

    terminal, child_side = pty.openpty()
    fcntl.ioctl(child_side, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # 40 rows of 160 columns
    process = subprocess.Popen([sys.executable, "-m", "studio", *map(str, args)], stdout=subprocess.DEVNULL,
                               stderr=child_side, env={**os.environ, "PYTHONPATH": str(ROOT)})
    os.close(child_side)
    shown = []
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the child has closed the terminal
            break
        if not chunk:
            break
        shown.append(chunk)
    os.close(terminal)
    return process.wait(timeout=300), b"".join(shown).decode()


def test_the_merge_shows_one_bar_that_is_full_only_when_the_merge_is_done(mistral, write_config, tmp_path):
    """The bar adds up every stage, as the Build tab's does: writing the weights is not the end while the routers
    are still being refined. On a terminal it is a bar with log lines above it; in a log, a line now and then.
    transformers' loading bars are not shown."""
    base, experts = mistral
    data = moe_yaml(base, experts, gate_mode="expert_text")
    for k, expert in enumerate(data["experts"]):
        (tmp_path / f"domain-{k}.txt").write_text(domain_text(ALPHABETS[k], seed=k))
        expert["calibration_text"] = [str(tmp_path / f"domain-{k}.txt")]
    config = write_config(data)

    code, shown = studio_on_a_terminal("merge", config, tmp_path / "bar")
    assert code == 0, shown
    frames = [part.strip() for line in shown.splitlines() for part in line.split("\r") if "%|" in part]
    shares = [int(frame.split("%|")[0]) for frame in frames]
    assert shares == sorted(shares) and shares[-1] == 100
    assert all(frame.endswith(f"Merged into {tmp_path / 'bar'}") for frame in frames if frame.startswith("100%|"))
    log = [part for line in shown.splitlines() for part in line.split("\r") if part.strip() and "%|" not in part]
    assert log[0] == f"Opening {base}" and log[-1].startswith("Wrote ") and "Loading weights" not in shown
    assert any(line.startswith("Kept the ") for line in log)  # refinement ran after the weights were written

    logged = studio("merge", config, tmp_path / "log")  # stderr is a pipe, as when it goes to a file
    assert logged.returncode == 0, logged.stderr
    assert "\r" not in logged.stderr and "Loading weights" not in logged.stderr
    lines = [line for line in logged.stderr.splitlines() if line.startswith("[")]
    shares = [int(line[1:].split("%]")[0]) for line in lines]
    assert shares == sorted(shares) and lines[-1] == f"[100%] Merged into {tmp_path / 'log'}"
    assert all(not line.startswith("[100%]") for line in lines[:-1])


def test_bad_config_exits_2_with_one_paragraph(write_config, tmp_path):
    config = write_config({"base_model": "x/y", "gateway_mode": "cheap_embed", "experts": [{"source_model": "a/b"}]})
    done = studio("merge", config, tmp_path / "out")
    assert done.returncode == 2
    assert "did you mean `gate_mode`" in done.stderr and "Traceback" not in done.stderr
    verbose = studio("merge", config, tmp_path / "out", "-v")
    assert "Traceback" in verbose.stderr
    assert not (tmp_path / "out").exists()


def test_missing_local_model_is_named(write_config, tmp_path):
    config = write_config({"base_model": str(tmp_path / "nowhere"), "gate_mode": "random",
                           "experts": [{"source_model": "./a"}, {"source_model": "./b"}]})
    done = studio("merge", config, tmp_path / "out")
    assert done.returncode == 2 and "nowhere does not exist" in done.stderr


def test_no_tokenizer_copy(mistral, write_config, tmp_path):
    base, experts = mistral
    done = studio("merge", write_config(moe_yaml(base, experts, gate_mode="random")), tmp_path / "o",
                  "--no-copy-tokenizer")
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "o" / "tokenizer.json").exists()


def test_plan_prints_the_table_and_writes_nothing(mistral, write_config, tmp_path):
    base, experts = mistral
    config = write_config(moe_yaml(base, experts))
    before = sorted(tmp_path.rglob("*"))
    done = studio("plan", config)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["role", "model", "family", "layers", "hidden", "intermediate", "heads", "kv",
                                "heads", "parameters", "dtype", "size", "where"]
    assert sum(line.startswith("experts[") for line in lines) == 4
    assert "output architecture       Mixtral" in done.stdout and "memory to run, 4-bit" in done.stdout
    assert sorted(tmp_path.rglob("*")) == before


def test_plan_reports_misfits_with_both_values(mistral, llama_tied, write_config):
    config = write_config(moe_yaml(mistral[0], [mistral[1][0], llama_tied[1][0]]))
    done = studio("plan", config)
    assert done.returncode == 2
    assert "model family is llama, but the base" in done.stderr
    assert "llama" in done.stdout  # the table is still shown


# Configs that break a rule needing no model file, on Hub ids that are never fetched: opening one (offline) would
# fail with "could not be fetched" instead of the rule.
HUB_BASE = "studio-tests/never-published-base"
RULE_BREAKERS = {
    "identical experts": ({"experts": [{"source_model": "studio-tests/a", "positive_prompts": ["x"]},
                                       {"source_model": "studio-tests/a", "positive_prompts": ["y"]}]},
                          "identical experts are useless without training"),
    "no prompts": ({"experts": [{"source_model": "studio-tests/a", "positive_prompts": ["x"]},
                                {"source_model": "studio-tests/b"}]}, "has no `positive_prompts`"),
    "same prompts": ({"experts": [{"source_model": "studio-tests/a", "positive_prompts": ["x"]},
                                  {"source_model": "studio-tests/b", "positive_prompts": ["x"]}]},
                     "Every expert has the same prompts"),
    "missing calibration text": ({"gate_mode": "expert_text", "experts": [
        {"source_model": "studio-tests/a", "positive_prompts": ["x"], "calibration_text": ["/nonexistent/a.txt"]},
        {"source_model": "studio-tests/b", "positive_prompts": ["y"]}]}, "/nonexistent/a.txt is not a file"),
}


@pytest.mark.parametrize("name", RULE_BREAKERS)
def test_rules_are_reported_before_any_model_is_opened(name, tmp_path, monkeypatch):
    from studio.app.ui.build import check_models
    from studio.build.merge import merge
    from studio.config import parse_config
    from studio.errors import StudioError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    fields, rule = RULE_BREAKERS[name]
    config = parse_config({"base_model": HUB_BASE, **fields})
    log = []
    with pytest.raises(StudioError, match=rule):
        merge(config, tmp_path / "out", log=log.append)
    assert log == [] and not (tmp_path / "out").exists()
    _, _, message = check_models(yaml.safe_dump({"base_model": HUB_BASE, **fields}))
    assert message.startswith("**The config breaks these rules:**") and rule in message


def test_plan_reports_a_rule_before_any_model_is_opened(write_config):
    fields, rule = RULE_BREAKERS["identical experts"]
    done = studio("plan", write_config({"base_model": HUB_BASE, **fields}), env={"HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2 and rule in done.stderr
    assert "could not be fetched" not in done.stderr and done.stdout == ""


def test_a_signal_during_a_deferred_block_is_handled_when_it_ends():
    """A bar built while SIGTERM arrives is built whole; the interrupt comes right after."""
    import os
    import signal
    import time

    from studio.app import cli

    previous = cli._catch_signals()
    reached = False
    try:
        with pytest.raises(cli.Stopped):
            with cli._signals_deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.05)
                reached = True
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        cli.STOP.clear()
    assert reached


def test_sampling_flags_name_the_chat_settings_defaults_without_loading_torch():
    """`--help` names ChatSettings' own defaults (chat: after the model's; route: short and greedy), and answers
    without importing torch."""
    chat, route = studio("chat", "--help"), studio("route", "--help")
    assert "generation_config.json, else 0.95" in " ".join(chat.stdout.split())
    route_help = " ".join(route.stdout.split())
    assert "(default 0)" in route_help and "(default 32)" in route_help
    probe = ("import runpy, sys\nsys.argv = ['studio', 'chat', '--help']\ntry:\n"
             "    runpy.run_module('studio', run_name='__main__')\nexcept SystemExit:\n    pass\n"
             "print('torch loaded' if 'torch' in sys.modules else 'no torch')")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert loaded.stdout.strip().endswith("no torch"), loaded.stdout[-300:] + loaded.stderr[-300:]
