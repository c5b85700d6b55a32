"""Nothing of the user's is ever lost: what a merge may replace, its lock, its leftovers, and signals.

The CLI runs in-process (studio.app.cli.main) where no signal is involved, and as a real process where one is.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from studio.app.cli import main
from studio.build.destination import MARKER, OutputLock, leftovers, remove_stale
from studio.build.synthetic import make_family
from studio.config import load_config

from conftest import moe_yaml, plan_of

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer) -> tuple[Path, list[Path]]:
    """A family of its own (module scope), under a folder `models/` the tests may point symlinks at."""
    return make_family(tmp_path_factory.mktemp("dest") / "models", 2, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def config_file(models, tmp_path_factory) -> Path:
    base, experts = models
    path = tmp_path_factory.mktemp("cfg") / "moe.yml"
    path.write_text(yaml.safe_dump(moe_yaml(base, experts, gate_mode="random")))
    return path


def cli(capsys, *args) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def digest(folder: Path) -> dict[str, str]:
    """Every file under a folder and its content's hash: what must survive a refused merge."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def user_folder(path: Path) -> Path:
    (path / "notes").mkdir(parents=True)
    (path / "thesis.txt").write_text("three years of work")
    (path / "notes" / "ideas.md").write_text("# ideas")
    return path


def test_empty_output_path_is_refused_and_the_working_folder_kept(capsys, config_file, tmp_path, monkeypatch):
    home = user_folder(tmp_path / "work")
    monkeypatch.chdir(home)
    before = digest(home)
    for flags in ([], ["--overwrite"]):
        code, err = cli(capsys, "merge", config_file, "", *flags)
        assert code == 2 and 'The output folder is empty ("")' in err and "Traceback" not in err
    assert digest(home) == before


@pytest.mark.parametrize("spelling", [".", "./", "../work", "notes/..", "$PWD"])
def test_the_working_folder_is_never_replaced(capsys, config_file, tmp_path, monkeypatch, spelling):
    work = user_folder(tmp_path / "work")
    monkeypatch.chdir(work)
    before = digest(work)
    code, err = cli(capsys, "merge", config_file, str(work) if spelling == "$PWD" else spelling, "--overwrite")
    assert code == 2 and "cannot be written: it is the working folder" in err
    assert digest(work) == before


def test_a_folder_holding_the_working_folder_is_never_replaced(capsys, config_file, tmp_path, monkeypatch):
    work = user_folder(tmp_path / "a" / "work")
    monkeypatch.chdir(work)
    code, err = cli(capsys, "merge", config_file, "..", "--overwrite")
    assert code == 2 and f"it holds the working folder {work}" in err
    assert (work / "thesis.txt").read_text() == "three years of work"


def test_the_home_folder_is_never_replaced(capsys, config_file, tmp_path, monkeypatch):
    home = user_folder(tmp_path / "home" / "me")
    monkeypatch.setenv("HOME", str(home))
    before = digest(home)
    for out in ("~", str(home)):
        code, err = cli(capsys, "merge", config_file, out, "--overwrite")
        assert code == 2 and "it is the home folder" in err
    assert digest(home) == before


def test_overwrite_refuses_a_folder_that_is_not_an_earlier_merge(capsys, config_file, tmp_path):
    out = user_folder(tmp_path / "photos")
    before = digest(out)
    code, err = cli(capsys, "merge", config_file, out, "--overwrite")
    assert code == 2
    assert "is not an earlier merge (it has no config.json, mergekit_moe_config.yml, weights)" in err
    assert digest(out) == before


def test_overwrite_replaces_an_earlier_merge_and_an_empty_folder(capsys, config_file, tmp_path):
    out = tmp_path / "moe"
    out.mkdir()
    assert cli(capsys, "merge", config_file, out, "--overwrite", "--random-seed", "1")[0] == 0
    first = digest(out)
    assert cli(capsys, "merge", config_file, out, "--overwrite", "--random-seed", "2")[0] == 0
    second = digest(out)
    assert first.keys() == second.keys() and first["model.safetensors"] != second["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def test_a_symlink_to_the_models_cannot_reach_a_source(capsys, config_file, models, tmp_path):
    base, experts = models
    link = tmp_path / "link"
    link.symlink_to(experts[0].parent)
    before = digest(experts[0].parent)
    for out in (link / experts[0].name, experts[0] / ".." / experts[0].name, link / "base" / "moe"):
        code, err = cli(capsys, "merge", config_file, out, "--overwrite")
        assert code == 2 and "Traceback" not in err
        assert "is not an earlier merge" in err or "lies inside the model folder" in err
    assert digest(experts[0].parent) == before
    assert not [p for p in experts[0].parent.iterdir() if p.name.startswith(".")]


def test_output_inside_or_holding_a_source_is_refused(capsys, config_file, models, tmp_path):
    base, experts = models
    before = digest(base)
    for out in (base / "moe", base / "deeper" / "moe"):
        code, err = cli(capsys, "merge", config_file, out)
        assert code == 2 and f"lies inside the model folder {base}, which the merge reads" in err
    assert digest(base) == before and sorted(p.name for p in base.iterdir()) == sorted(before)
    # An earlier merge that someone moved a source model into: replacing it would delete the source.
    out = tmp_path / "moe"
    assert cli(capsys, "merge", config_file, out)[0] == 0
    os.symlink(base, out / "base-link")
    nested = make_family(out / "inner", 1)[0]
    data = yaml.safe_load(config_file.read_text())
    data["base_model"] = str(nested)
    data["experts"] = [{"source_model": str(nested)}, {"source_model": str(nested)}]
    other = tmp_path / "other.yml"
    other.write_text(yaml.safe_dump(data))
    code, err = cli(capsys, "merge", other, out, "--overwrite", "--i-understand-this-is-not-useful-without-training")
    assert code == 2 and f"holds the model folder {nested}, which the merge reads" in err
    assert (nested / "model.safetensors").exists()


def test_output_under_a_regular_file_is_named(capsys, config_file, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    code, err = cli(capsys, "merge", config_file, tmp_path / "file.txt" / "out")
    assert code == 2 and f"{tmp_path / 'file.txt'} is a file, not a folder" in err
    code, err = cli(capsys, "merge", config_file, tmp_path / "file.txt")
    assert code == 2 and "is a file; choose a folder path" in err
    assert (tmp_path / "file.txt").read_text() == "x"


def test_a_second_merge_to_a_locked_output_is_refused_naming_the_first(capsys, config_file, tmp_path):
    out = tmp_path / "moe"
    with OutputLock(out):
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime())
        code, err = cli(capsys, "merge", config_file, out)
    assert code == 2
    assert f"Another merge is writing to {out} (pid {os.getpid()}, started {started}" in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    assert cli(capsys, "merge", config_file, out)[0] == 0


def studio_process(*args, **kwargs) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "studio", *map(str, args)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_two_merges_at_once_one_wins_the_other_is_refused(config_file, tmp_path):
    out = tmp_path / "moe"
    procs = [studio_process("merge", config_file, out) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    refused = next(err for code, err in results if code == 2)
    assert "Another merge is writing to" in refused or "already exists and is not empty" in refused
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def fake_partial(parent: Path, name: str, marker: bool = True, content: bool = True) -> Path:
    """A staging folder as a killed merge leaves it (the interruption tests below make real ones)."""
    path = parent / f".{name}.partial-{random.randbytes(4).hex()}"
    path.mkdir(parents=True)
    if marker:
        (path / MARKER).write_text(json.dumps({"pid": 1, "started": 0, "out": name}))
    if content:
        (path / "model.safetensors").write_bytes(b"\0" * 4096)
    return path


def test_only_our_stale_partials_are_removed_and_not_while_their_merge_runs(tmp_path):
    stale = fake_partial(tmp_path, "a")
    empty = fake_partial(tmp_path, "b", marker=False, content=False)
    not_ours = fake_partial(tmp_path, "c", marker=False)
    running = fake_partial(tmp_path, "d")
    lookalike = tmp_path / ".e.partial-xyz"
    lookalike.mkdir()
    (lookalike / MARKER).write_text("")
    with OutputLock(tmp_path / "d"):
        assert remove_stale(tmp_path) == [running]
    assert not stale.exists() and not empty.exists()
    assert not_ours.exists() and running.exists() and lookalike.exists()
    assert set(leftovers(tmp_path)) == {"d"}


def test_free_space_check_names_the_partial_of_a_running_merge(capsys, config_file, tmp_path, monkeypatch):
    running = fake_partial(tmp_path, "other")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=10_000))
    with OutputLock(tmp_path / "other"):
        code, err = cli(capsys, "merge", config_file, tmp_path / "moe")
    assert code == 2 and "Not enough disk space on" in err and "plus 64 MiB" in err
    assert f"{running} (0.00 GB so far) belongs to a merge still running" in err


# A merge long enough to be killed while it writes: 4 experts of 6 layers, float32, shards of 2 MB, each fsynced.
@pytest.fixture(scope="module")
def long_merge(tmp_path_factory, tokenizer) -> Path:
    folder = tmp_path_factory.mktemp("long")
    base, experts = make_family(folder / "models", 4, tokenizer=tokenizer, hidden=192, intermediate=768, layers=6,
                                dtype=__import__("torch").float32)
    path = folder / "long.yml"
    path.write_text(yaml.safe_dump(moe_yaml(base, experts, gate_mode="random", dtype="float32")))
    return path


def start_and_wait_for_staging(config: Path, out: Path, *flags) -> subprocess.Popen:
    """Start a merge and return once its staging folder holds a weight file being written."""
    proc = studio_process("merge", config, out, "--out-shard-size", "2M", *flags)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if any(out.parent.glob(f".{out.name}.partial-*/*.safetensors")):
            return proc
        time.sleep(0.005)
    proc.kill()
    raise AssertionError(f"the merge never started writing: {proc.communicate()}")


def looks_like_a_model(folder: Path) -> bool:
    return folder.exists() and ((folder / "config.json").exists() or any(folder.glob("*.safetensors")))


def staging_bytes(parent: Path, name: str) -> int:
    """Bytes in the merge's staging folder so far (a lower bound if the merge ends while they are counted)."""
    total = 0
    try:
        for file in parent.glob(f".{name}.partial-*/*"):
            total += file.stat().st_size if file.is_file() else 0
    except FileNotFoundError:  # the merge ended and moved the folder, or a file of it, into place since the listing
        pass
    return total


def kill_at(config: Path, out: Path, target: int) -> subprocess.Popen:
    """Start a merge and SIGKILL it once its staging folder holds `target` bytes (or when it ends first)."""
    proc = start_and_wait_for_staging(config, out)
    while proc.poll() is None and staging_bytes(out.parent, out.name) < target:
        time.sleep(0.001)
    proc.kill()
    proc.wait()
    return proc


def test_sigkill_at_random_points_never_leaves_a_model_and_the_next_merge_cleans_up(long_merge, tmp_path):
    weights = plan_of(load_config(long_merge)).total_bytes
    reference = tmp_path / "reference"
    assert studio_process("merge", long_merge, reference, "--out-shard-size", "2M").wait(timeout=300) == 0
    complete = {p.name: p.stat().st_size for p in reference.iterdir()}
    out = tmp_path / "moe"
    rng = random.Random(12)
    killed_mid_write = 0
    for _ in range(10):
        kill_at(long_merge, out, int(rng.uniform(0.02, 0.9) * weights))  # a random point of the write
        if out.exists():  # the merge ended before the kill: then OUT must be the whole merge, never part of one
            assert {p.name: p.stat().st_size for p in out.iterdir()} == complete
            shutil.rmtree(out)
            continue
        assert not looks_like_a_model(out), "a killed merge left a model-looking folder at OUT"
        killed_mid_write += bool(list(tmp_path.glob(".moe.partial-*")))
    assert killed_mid_write >= 8, f"only {killed_mid_write} of 10 kills landed while the merge wrote"
    done = studio_process("merge", long_merge, out)
    assert done.wait(timeout=300) == 0, done.stderr.read()
    assert "left by an interrupted merge" in done.stderr.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "reference"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_sigterm_sighup_and_sigint_clean_up_like_ctrl_c(long_merge, tmp_path, signum):
    out = tmp_path / "moe"
    proc = start_and_wait_for_staging(long_merge, out)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"Interrupted ({signal.Signals(signum).name}); no output was left behind." in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("how", ["swapped", "deleted"])
def test_a_source_changed_mid_merge_fails_the_merge(tmp_path, tokenizer, how):
    """Another model of the same shape copied over an expert while the merge reads it would give a mixed expert."""
    from studio.build.merge import MergeOptions, merge
    from studio.config import parse_config
    from studio.errors import StudioError

    base, experts = make_family(tmp_path / "models", 2, tokenizer=tokenizer)
    victim = experts[0] / "model.safetensors"
    config = parse_config(moe_yaml(base, experts, gate_mode="random"))
    done = []

    def progress(p):
        if p.stage == "write" and not done:
            done.append(True)
            if how == "swapped":
                victim.write_bytes((experts[1] / "model.safetensors").read_bytes())  # same size, other weights
            else:
                victim.unlink()

    with pytest.raises(StudioError) as info:
        merge(config, tmp_path / "moe", MergeOptions(out_shard_size=100_000), progress=progress, log=lambda m: None)
    what = "changed (size or modification time)" if how == "swapped" else "was deleted"
    assert f"Model {experts[0]}: {victim} {what} while the merge was reading it" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_a_file_size_limit_is_named_with_the_bytes_needed(long_merge, tmp_path):
    import resource

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1_000_000, 1_000_000))

    out = tmp_path / "moe"
    proc = studio_process("merge", long_merge, out, preexec_fn=limit_file_size)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert f"Writing {out} failed: a file grew past the size limit of this process or of the filesystem" in err
    weights = plan_of(load_config(long_merge)).total_bytes
    assert f"(see `ulimit -f`). The merge needs {weights:,} bytes ({weights / 1e9:.2f} GB) of weights plus 64 MiB" in err
    assert "Traceback" not in err and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.fixture
def small_disk(long_merge, tmp_path):
    """A tmpfs with room for the long merge and the 64 MiB margin, and 4 MiB more: a real disk that can fill up.
    Mounting needs root; elsewhere the test is skipped."""
    disk = tmp_path / "disk"
    disk.mkdir()
    size = plan_of(load_config(long_merge)).total_bytes + 68 * 2**20
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)],
                                                   capture_output=True).returncode == 0
    if not mounted:
        pytest.skip("mounting a tmpfs needs root")
    yield disk
    subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_is_named_with_the_disk_and_the_bytes_needed(long_merge, small_disk):
    from studio.build.merge import MergeOptions, merge
    from studio.errors import StudioError

    weights = plan_of(load_config(long_merge)).total_bytes
    filled = []

    def fill_the_disk(p):  # another program fills the disk while the merge writes
        if p.stage == "write" and not filled:
            filled.append(True)
            with open(small_disk / "filler", "wb") as f:
                try:
                    while True:
                        f.write(b"\0" * 2**20)
                except OSError:
                    pass

    with pytest.raises(StudioError) as info:
        merge(load_config(long_merge), small_disk / "moe", MergeOptions(out_shard_size=2_000_000),
              progress=fill_the_disk, log=lambda m: None)
    assert str(info.value).startswith(f"Writing {small_disk / 'moe'} failed: the disk is full on {small_disk}. "
                                      f"The merge needs {weights:,} bytes ({weights / 1e9:.2f} GB) of weights plus "
                                      f"64 MiB")
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_a_read_only_folder_is_named(capsys, config_file, tmp_path):
    """A read-only filesystem (permissions alone do not stop root, so a read-only tmpfs)."""
    disk = tmp_path / "ro"
    disk.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        code, err = cli(capsys, "merge", config_file, disk / "moe")
    finally:
        subprocess.run(["umount", str(disk)], check=True)
    assert code == 2 and f"Cannot write in {disk} (Read-only file system), where the merge would go" in err
