"""Training checkpoints with orbax ``CheckpointManager``: state (params, optimizer state, step) + metadata.

    ckpt = Checkpointer(run_dir / "checkpoints", keep=2)
    ckpt.save(step, state, {"epoch": 1, "batch": 3, ...})
    state, meta = ckpt.restore(abstract_state)          # latest step; arrays land with their shardings

Each step is written to a temporary directory and renamed when complete (orbax's
atomic finalize), so a crash mid-save leaves the previous checkpoints untouched.
Saves are synchronous: the step function donates the state buffers, so they must
not be read in the background after ``save`` returns.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

from mrjax import faults

log = logging.getLogger(__name__)


class Checkpointer:
    """Kept-last-N checkpoints of a training state under ``directory/<step>/{state,meta}``."""

    def __init__(self, directory: str | Path, keep: int = 2):
        self.directory = Path(directory).resolve()
        # A save killed midway leaves only orbax's temporary folder, removed on the next start.
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, meta: dict) -> None:
        faults.kill_when_present(f"checkpoint:{step}", self.directory, "*tmp*")
        self.manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))),
            force=True,
        )
        self.manager.wait_until_finished()

    def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
        """The state at ``step`` (default: latest) shaped and sharded like ``target`` (ShapeDtypeStructs)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        restored = self.manager.restore(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
        return restored["state"], dict(restored["meta"])

    def read_meta(self, step: int | None = None) -> dict:
        step = self.latest_step() if step is None else step
        restored = self.manager.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Checkpointer"]
