"""Where a merge writes: which folders it may replace, the lock on the output, and its staging folders.

A merge's output path comes from a person or a script (an unset "$OUT" is ""), so nothing is trusted as typed:
the path is resolved (symlinks, `..`, `~`, "") before any rule is applied, and `--overwrite` replaces only a
folder that is recognisably an earlier merge, or an empty one. Staging folders of killed merges are recognised
by their name and a marker file, and removed by the next merge into the same parent folder.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import time
import uuid
from pathlib import Path

from studio.errors import StudioError

try:
    import fcntl
except ImportError:  # Windows: no flock; merges there run without the lock (the other rules still hold)
    fcntl = None

MARKER = ".studio-partial"  # inside every staging folder: who made it, for whom
MERGE_FILES = ("config.json", "mergekit_moe_config.yml")  # with weights, what makes a folder an earlier merge
# Top-level folders of a Unix system (a container's /output or /models stays allowed under the usual rules).
SYSTEM_FOLDERS = {"bin", "boot", "dev", "etc", "home", "lib", "lib32", "lib64", "media", "mnt", "opt", "proc", "root",
                  "run", "sbin", "srv", "sys", "tmp", "usr", "var", "Users", "Applications", "System", "Library"}
LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-[0-9a-f]{8}$")


def resolve_output(out: str | Path) -> Path:
    """The absolute, symlink-free output path. An empty path is refused: it would mean the working folder."""
    text = str(out) if isinstance(out, Path) else out
    if not text.strip():
        raise StudioError('The output folder is empty (""); give the folder to write the merge to, e.g. ./out. '
                          '(Is a shell variable such as "$OUT" unset?)')
    path = Path(text).expanduser().resolve()
    blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), None)
    if blocker == path:
        raise StudioError(f"Output {path} is a file; choose a folder path.")
    if blocker is not None:
        raise StudioError(f"Output {path} cannot be made: {blocker} is a file, not a folder. Choose another path.")
    return path


def protected_reason(out: Path) -> str | None:
    """Why `out` may never be replaced, whatever the flags: it is or holds the working or home folder, or a folder
    of the system."""
    try:
        cwd = Path.cwd().resolve()
    except FileNotFoundError:  # the working folder was deleted: there is nothing left to protect
        cwd = None
    home = Path.home().resolve()
    if cwd is not None and (out == cwd or out in cwd.parents):
        return "it is the working folder" if out == cwd else f"it holds the working folder {cwd}"
    if out == home or out in home.parents:
        return "it is the home folder" if out == home else f"it holds the home folder {home}"
    if len(out.parts) == 1 or (len(out.parts) == 2 and out.name in SYSTEM_FOLDERS):
        return "it is a top-level folder of the system"
    if out.parent.name == "home" and len(out.parts) == 3:
        return "it is a user's home folder"
    return None


def is_earlier_merge(folder: Path) -> bool:
    """A folder this studio (or mergekit-moe) wrote: config, weights and mergekit_moe_config.yml."""
    has_weights = any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))
    return has_weights and all((folder / name).is_file() for name in MERGE_FILES)


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse an output that would destroy what is not ours to destroy. `out` comes from resolve_output."""
    reason = protected_reason(out)
    if reason:
        raise StudioError(f"Output {out} cannot be written: {reason}. Choose a new folder, e.g. {out / 'my-moe'}.")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not overwrite:
        raise StudioError(f"Output folder {out} already exists and is not empty. Choose another folder, or pass "
                          f"--overwrite to replace it once the new merge is complete (only an earlier merge can be "
                          f"replaced).")
    if not is_earlier_merge(out):
        missing = [n for n in MERGE_FILES if not (out / n).is_file()] + \
            ([] if any(out.glob("*.safetensors")) or any(out.glob("pytorch_model*.bin")) else ["weights"])
        raise StudioError(f"Output folder {out} is not an earlier merge (it has no {', '.join(missing)}), so "
                          f"--overwrite will not replace it: only a folder that a merge wrote (config.json, weights "
                          f"and mergekit_moe_config.yml) or an empty one is replaced. Choose another folder.")


def check_not_a_source(out: Path, sources: list[Path]) -> None:
    """The output may not be a model the merge reads, lie inside one, or hold one."""
    for folder in sources:
        folder = folder.resolve()
        if out == folder:
            raise StudioError(f"Output {out} would replace the model folder {folder}, which the merge reads. "
                              f"Choose another output folder.")
        if folder in out.parents:
            raise StudioError(f"Output {out} lies inside the model folder {folder}, which the merge reads. "
                              f"Choose a folder outside it.")
        if out in folder.parents:
            raise StudioError(f"Output {out} holds the model folder {folder}, which the merge reads. "
                              f"Choose another output folder.")


class OutputLock:
    """An exclusive lock on one output path, held for a whole merge: a file `.NAME.lock` in the parent folder,
    locked with flock (released by the kernel if the process dies), holding the owner's pid and start time."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.path = out.parent / f".{out.name}.lock"
        self._fd: int | None = None

    def acquire(self) -> "OutputLock":
        """Take the lock or raise StudioError naming the merge that holds it."""
        if not self.try_acquire():
            raise StudioError(f"Another merge is writing to {self.out} ({self.holder()}). Wait for it to finish, "
                              f"or choose another output folder.")
        os.ftruncate(self._fd, 0)
        os.write(self._fd, json.dumps({"pid": os.getpid(), "started": time.time()}).encode())
        return self

    def try_acquire(self) -> bool:
        make_parent(self.out.parent)
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise StudioError(f"Cannot write in {self.out.parent} ({exc.strerror}), where the merge would go. "
                                  f"Choose an output folder you can write to.") from None
            try:
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # The holder unlinks the file before unlocking; a lock taken on an unlinked file is no lock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)

    def holder(self) -> str:
        try:
            info = json.loads(self.path.read_text())
            started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
            return f"pid {info['pid']}, started {started}"
        except (OSError, ValueError, KeyError, TypeError):
            return "a merge that is just starting"

    def release(self) -> None:
        if self._fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def make_parent(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StudioError(f"Cannot create the output's parent folder {folder}: {exc.strerror}.") from None


def new_staging(out: Path) -> Path:
    """A hidden sibling folder to build the output in, marked as ours so a later merge can clean it up."""
    staging = out.parent / f".{out.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        (staging / MARKER).write_text(json.dumps({"pid": os.getpid(), "started": time.time(), "out": out.name}))
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise StudioError(f"Cannot write in {out.parent} ({exc.strerror}), where the merge would go. Choose an "
                          f"output folder you can write to.") from None
    return staging


def leftovers(parent: Path) -> dict[str, list[Path]]:
    """Staging folders (and replaced outputs) that merges left in `parent`, by output name; only ours: the
    name's pattern and, inside, the marker (or nothing at all: a merge killed right after mkdir), or for a
    replaced output, an earlier merge's files."""
    found: dict[str, list[Path]] = {}
    if not parent.is_dir():
        return found
    for path in parent.iterdir():
        match = LEFTOVER.match(path.name)
        if not match or path.is_symlink() or not path.is_dir():
            continue
        ours = (path / MARKER).is_file() or not any(path.iterdir()) if match["kind"] == "partial" \
            else is_earlier_merge(path)
        if ours:
            found.setdefault(match["name"], []).append(path)
    return found


def folder_bytes(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total


def remove_stale(parent: Path, held: OutputLock | None = None, log=lambda message: None) -> list[Path]:
    """Remove the leftovers of merges that are no longer running (their output's lock is free; `held` is the lock
    this merge holds, whose own leftovers are stale). Returns what is left: folders of merges still running."""
    live = []
    for name, paths in leftovers(parent).items():
        lock = OutputLock(parent / name)
        mine = held is not None and lock.path == held.path
        if not mine and not lock.try_acquire():
            live.extend(paths)
            continue
        try:
            for path in paths:
                log(f"Removing {path.name}, left by an interrupted merge ({folder_bytes(path) / 1e6:.1f} MB)")
                shutil.rmtree(path, ignore_errors=True)
        finally:
            if not mine:
                lock.release()
    return live


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem `path` (or its nearest existing parent) is on: the disk to name."""
    path = next(p for p in [path, *path.parents] if p.exists())
    device = path.stat().st_dev
    while path.parent != path and path.parent.stat().st_dev == device:
        path = path.parent
    return path


DISK_MARGIN = 64 * 2**20  # config, tokenizer and card files, and room for the filesystem's own bookkeeping


def check_disk_space(out: Path, weights: int, in_progress: list[Path]) -> None:
    """The rule: the weights' bytes plus a 64 MiB margin must be free on the output's disk. Staging folders of
    merges still running there will grow, so they are named when the space is short."""
    parent = next(p for p in [out, *out.parents] if p.exists())
    free = shutil.disk_usage(parent).free
    needed = weights + DISK_MARGIN
    if free >= needed:
        return
    others = "".join(f" {p} ({folder_bytes(p) / 1e9:.2f} GB so far) belongs to a merge still running." for p in
                     in_progress)
    raise StudioError(f"Not enough disk space on {mount_point(parent)} for {out}: the merge writes {weights:,} bytes "
                      f"of weights ({weights / 1e9:.2f} GB) and needs them plus 64 MiB for the other files free, "
                      f"{needed:,} bytes in all, but only {free:,} bytes ({free / 1e9:.2f} GB) are free.{others} "
                      f"Free some space or choose another output folder.")


def disk_full_error(exc: OSError, out: Path, weights: int) -> StudioError | None:
    """A named error for a write that ran out of room (disk full, quota, file size limit), else None."""
    disk = mount_point(out.parent)
    needed = f"{weights:,} bytes ({weights / 1e9:.2f} GB) of weights plus 64 MiB"
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "the disk is full" if exc.errno == errno.ENOSPC else "the disk quota is used up"
        return StudioError(f"Writing {out} failed: {what} on {disk}. The merge needs {needed}; free some space "
                           f"or choose another output folder. Nothing was left at {out}.")
    if exc.errno == errno.EFBIG:
        return StudioError(f"Writing {out} failed: a file grew past the size limit of this process or of the "
                           f"filesystem on {disk} (see `ulimit -f`). The merge needs {needed}; raise the limit, or "
                           f"pass a smaller --out-shard-size. Nothing was left at {out}.")
    return None


def move_into_place(staging: Path, out: Path, overwrite: bool) -> None:
    """Swap the finished folder in; an old output (with --overwrite) is removed only after the swap. The
    destination is checked again: it may have changed while the merge ran. Signals wait until both renames are
    done, so a kill between them cannot leave the old merge moved aside and the new one deleted."""
    check_destination(out, overwrite)
    signals = {getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)}
    mask = getattr(signal, "pthread_sigmask", lambda how, mask: set())  # Windows has no signal masks
    blocked = mask(signal.SIG_BLOCK if hasattr(signal, "SIG_BLOCK") else 0, signals)
    try:
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
        os.replace(staging, out)
        (out / MARKER).unlink(missing_ok=True)  # after the rename: a staging folder never lacks its marker
    finally:
        mask(signal.SIG_SETMASK if hasattr(signal, "SIG_SETMASK") else 2, blocked)
    if old:
        shutil.rmtree(old, ignore_errors=True)
