"""`--report-to`: mirror the run's metric records to a local experiment tracker.

`metrics.jsonl` stays the record (reports and resumes read it); a tracker only shows it. Both
trackers are local-first and need no network: `tensorboard` writes event files into
`<out_dir>/tensorboard/` (`tensorboard --logdir <out_dir>`), `trackio` writes to its local
database (`$TRACKIO_DIR`, by default `~/.cache/huggingface/trackio`; `trackio show --project
subspace`). Each is an optional dependency (`pip install 'subspace-optim[tensorboard]'` or
`[trackio]`); asking for a missing one is a one-line error before any data is built.
A record `{"event": "train", "step": 10, "loss": ...}` becomes the scalars `train/loss`, ...
at step 10.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path

PACKAGES = {"tensorboard": "tensorboard", "trackio": "trackio"}
TRACKIO_PROJECT = "subspace"


def check_available(kind: str) -> None:
    """Raise ValueError naming the package to install if the tracker `kind` is missing."""
    package = PACKAGES.get(kind)
    if package and importlib.util.find_spec(package) is None:
        raise ValueError(f"--report-to {kind} needs the package {package!r}, which is not "
                         f"installed: pip install 'subspace-optim[{kind}]'")


def scalars(record: dict) -> dict[str, float]:
    """`event/key -> value` for every number of a metric record (not its step or event)."""
    event = record.get("event", "train")
    return {f"{event}/{k}": float(v) for k, v in record.items()
            if k not in ("event", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)}


class Tracker:
    def log(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoard(Tracker):
    def __init__(self, out_dir: Path, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter

        # on a resume, hide what the interrupted run logged after its checkpoint
        purge = resume_step + 1 if resume_step is not None else None
        self.writer = SummaryWriter(log_dir=str(out_dir / "tensorboard"), purge_step=purge)

    def log(self, record: dict) -> None:
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["step"])

    def close(self) -> None:
        self.writer.close()


class Trackio(Tracker):
    def __init__(self, out_dir: Path, config: dict, resume: bool):
        import trackio

        self.trackio = trackio
        with contextlib.redirect_stdout(sys.stderr):  # stdout is the command's JSON summary
            trackio.init(project=TRACKIO_PROJECT, name=out_dir.resolve().name, config=config,
                         resume="allow" if resume else "never", embed=False,
                         auto_log_cpu=False, auto_log_gpu=False)

    def log(self, record: dict) -> None:
        self.trackio.log(scalars(record), step=record["step"])

    def close(self) -> None:
        with contextlib.redirect_stdout(sys.stderr):
            self.trackio.finish()


def open_tracker(kind: str, out_dir: Path, config: dict, resume_step: int | None) -> Tracker:
    check_available(kind)
    if kind == "tensorboard":
        return TensorBoard(out_dir, resume_step)
    if kind == "trackio":
        return Trackio(out_dir, config, resume_step is not None)
    return Tracker()
