"""Fault injection for the kill tests: ``MRJAX_FAULT=<point>`` SIGKILLs this process there.

The loop names its points ``<stage>:shard<j>`` (after shard j of a generation stage is
written), ``dpo:step<s>`` (after training step s and its checkpoint) and
``checkpoint:<s>`` (while orbax is writing the checkpoint of step s). Unset, every point
is a no-op; nothing else in mrjax reads the variable.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

ENV = "MRJAX_FAULT"


def armed(name: str) -> bool:
    return os.environ.get(ENV) == name


def point(name: str) -> None:
    """SIGKILL this process now if ``name`` is the armed point."""
    if armed(name):
        os.kill(os.getpid(), signal.SIGKILL)


def kill_when_present(name: str, directory: str | Path, pattern: str, timeout_s: float = 60.0) -> None:
    """If ``name`` is armed: SIGKILL this process as soon as ``directory`` holds a path matching
    ``pattern`` (e.g. orbax's temporary checkpoint folder: a kill in the middle of a write)."""
    if not armed(name):
        return
    directory = Path(directory)

    def watch():
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            if any(directory.glob(pattern)):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()


__all__ = ["ENV", "armed", "kill_when_present", "point"]
