"""The run directory's bookkeeping: one run at a time (an OS lock), stage markers that record what
each stage read and wrote (size and sha256 of every file), and the checks that a marker still holds.

A stage marker ``.done/<stage>.json`` holds the stage's figures, its wall time and two records,
``inputs`` and ``outputs``: ``{file: {"bytes": n, "sha256": hex}}``, files inside the run directory
named relative to it (a moved or copied run still verifies), others by absolute path. A marker is
trusted only while every recorded file is still there with the same bytes; otherwise the stage is
redone, and every later stage whose inputs then differ is redone too (their own records say so).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Iterable

from mrjax.mesh import agreed, is_main_process

LOCK_FILE = ".lock"
# Files at least this big (model weights) are re-hashed only when their size or mtime changed:
# a re-run verifies a whole run in seconds, and a file rewritten with other bytes still differs.
FAST_PATH_BYTES = 64 * 1024**2


class RunDirError(ValueError):
    """A run directory that cannot be used (a file, not writable, in use by another run)."""


# ----------------------------------------------------------------------------- where a run may write


def check_run_dir(run_dir: str | Path) -> None:
    """Refuse a run directory that is a file or cannot be written, without writing anything that stays."""
    path = Path(run_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise RunDirError(f"run_dir {path} is a file, not a directory: choose another run_dir")
    existing = path
    while not existing.exists():  # the nearest folder that exists is where the run's folders would be made
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirError(f"run_dir {path}: {existing} is a file, so the run directory cannot be made")
    probe = existing / f".mrjax-write-test-{os.getpid()}"
    try:
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"run_dir {path} is not writable ({err.strerror}: {existing})") from None


class RunLock:
    """``run_dir/.lock`` held with ``fcntl.flock`` for as long as this process runs: a second run on the
    same directory is refused at once, and the kernel drops the lock when the process ends, even by
    SIGKILL (never a stale lock to remove). In a multi-process job process 0 holds it."""

    def __init__(self, run_dir: str | Path, what: str = "run"):
        self.path = Path(run_dir) / LOCK_FILE
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        problem = ""
        if is_main_process():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
                os.close(fd)
                problem = (f"{self.path.parent} is in use by another mrjax process ({holder}); wait for it to end "
                           "or use another run_dir")
            else:
                started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{self.what}: pid {os.getpid()} on {socket.gethostname()}, started {started}\n"
                          .encode(), 0)
                self._fd = fd
        if not agreed(not problem):
            raise RunDirError(problem or f"{self.path.parent} is in use by another mrjax process (process 0 could not "
                                         "lock it)")
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ----------------------------------------------------------------------------- file records

_hash_cache: dict[tuple[str, int, int], str] = {}


def _sha256(path: Path, stat: os.stat_result) -> str:
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _hash_cache:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
        _hash_cache[key] = digest.hexdigest()
    return _hash_cache[key]


def _name(root: Path, path: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _path(root: Path, name: str) -> Path:
    return Path(name) if Path(name).is_absolute() else root / name


def _files(paths: Iterable[str | Path]) -> list[Path]:
    out = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        elif p.is_file():
            out.append(p)
    return out


def record(root: Path, paths: Iterable[str | Path]) -> dict[str, dict]:
    """``{name: {"bytes", "sha256", "mtime_ns"}}`` of the files at ``paths`` (folders: every file in them;
    paths that do not exist are left out: a stage's optional output)."""
    out = {}
    for f in _files(paths):
        stat = f.stat()
        out[_name(root, f)] = {"bytes": stat.st_size, "sha256": _sha256(f, stat), "mtime_ns": stat.st_mtime_ns}
    return out


def first_change(root: Path, recorded: dict[str, dict]) -> str | None:
    """The first recorded file that is missing or has other bytes, with what changed; None if all hold."""
    for name, was in sorted(recorded.items()):
        path = _path(root, name)
        if not path.is_file():
            return f"{name} is missing"
        stat = path.stat()
        if stat.st_size != was["bytes"]:
            return f"{name} changed ({stat.st_size} bytes, was {was['bytes']})"
        if stat.st_size >= FAST_PATH_BYTES and stat.st_mtime_ns == was.get("mtime_ns"):
            continue
        if _sha256(path, stat) != was["sha256"]:
            return f"{name} changed (other content)"
    return None


def marker_problem(root: Path, marker: dict) -> str | None:
    """Why a stage marker can no longer be trusted (a changed input or output), or None."""
    for kind in ("outputs", "inputs"):
        change = first_change(root, marker.get(kind) or {})
        if change:
            return f"{'an output' if kind == 'outputs' else 'an input'}: {change}"
    return None


# ----------------------------------------------------------------------------- markers


def stage_markers(where: Path) -> dict[str, dict]:
    """{stage: its figures} of the stages complete in ``where`` (the ``.done/<stage>.json`` markers)."""
    return {p.stem: json.loads(p.read_text()) for p in (where / ".done").glob("*.json")}


def read_marker(path: Path) -> dict | None:
    """A marker's content, or None when it is missing or unreadable (then the stage is not complete)."""
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def model_source(config, t: int) -> str | Path:
    """Where M_t lives: M_0 is the EFT model when EFT runs (else ``model.name``), M_t is iter_t/hf."""
    root = Path(config.run_dir)
    if t == 0:
        return root / "eft" / "hf" if config.eft.enabled else config.model.name
    return root / f"iter_{t}" / "hf"


__all__ = ["FAST_PATH_BYTES", "LOCK_FILE", "RunDirError", "RunLock", "check_run_dir", "first_change",
           "marker_problem", "model_source", "read_marker", "record", "stage_markers"]
