"""The output folder of a healing run, built in a staging folder and published by renaming.

The staging folder is a hidden sibling, `.<name>.partial`, so that it lies on the same file
system (a rename, not a copy) and so that `--resume` finds the checkpoints of an interrupted run
without being told where they are. Nobody ever sees a half-written output folder.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from finetune.checkpoint import read_state


class OutputError(RuntimeError):
    """An output folder that this run may not write, or a run that cannot be resumed."""


class OutputFolder:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.staging = self.path.parent / f".{self.path.name}.partial"
        self.checkpoints = self.staging / "checkpoints"
        self.tensorboard = self.staging / "tb"

    def check(self, replace: bool, resume: bool) -> None:
        """Refuse, before any work, a run that would overwrite results or throw away a checkpoint."""
        if self.path.exists() and not self.path.is_dir():
            raise OutputError(f"{self.path} exists and is not a folder")
        if self.path.exists() and not replace:
            raise OutputError(f"output folder {self.path} already exists: choose another --out, or pass --replace "
                              "to replace it once the new run is complete")
        has_checkpoint = read_state(self.checkpoints) is not None
        if resume and not has_checkpoint:
            raise OutputError(f"nothing to resume: {self.staging} holds no checkpoint of a run for {self.path}")
        if has_checkpoint and not resume:
            raise OutputError(f"an interrupted run for {self.path} is checkpointed in {self.staging}: add --resume "
                              f"{self.path} to continue it, or delete that folder to start over")

    def open(self, resume: bool) -> None:
        """Create the staging folder; a fresh run clears what a run that never checkpointed left there."""
        if not resume:
            shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True, exist_ok=True)

    def publish(self, replace: bool) -> None:
        """Drop the checkpoints (the adapter supersedes them) and rename the staging folder into place.

        Replacing swaps by two renames: the old folder steps aside, the new one takes its name, and
        only then is the old one deleted; if the second rename fails, the old folder is put back.
        """
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        if not self.path.exists():
            self.staging.rename(self.path)
            return
        if not replace:
            raise OutputError(f"output folder {self.path} appeared during the run; the results are in {self.staging}")
        aside = self.path.parent / f".{self.path.name}.replaced"
        shutil.rmtree(aside, ignore_errors=True)
        self.path.rename(aside)
        try:
            self.staging.rename(self.path)
        except BaseException:
            aside.rename(self.path)
            raise
        shutil.rmtree(aside)
