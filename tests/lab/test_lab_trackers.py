"""--report-to: the metric records mirrored to TensorBoard event files and to trackio's local
database (offline), metrics.jsonl unchanged; a missing tracker package is a one-line error."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lab_helpers import lab_cache, read_jsonl  # noqa: F401
from subspace_lab import trackers
from subspace_lab.cli import main


def _argv(lab_cache, out, *extra):
    return ["pretrain", "--model", "micro", "--max-docs", "40", "--vocab-size", "512",
            "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--eval-every", "2",
            "--steps", "4", "--log-every", "1", "--cache-dir", str(lab_cache), "--no-progress",
            "--out-dir", str(out), "--threads", "1", *extra]


def test_tensorboard_mirrors_the_records(tmp_path, lab_cache):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "tb"
    assert main(_argv(lab_cache, out, "--report-to", "tensorboard", "--optimizer", "galore",
                      "--rank", "4")) == 0
    records = read_jsonl(out / "metrics.jsonl")
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(r["step"], pytest.approx(r["loss"])) for r in records if r["event"] == "train"]
    val = [(e.step, e.value) for e in events.Scalars("eval/val_loss")]
    assert val == [(r["step"], pytest.approx(r["val_loss"])) for r in records if r["event"] == "eval"]


TRACKIO_RUN = """
import json, sys
from subspace_lab.cli import main
assert main(json.loads(sys.argv[1])) == 0
from trackio.sqlite_storage import SQLiteStorage
print(json.dumps(SQLiteStorage.get_logs(project="subspace", run=sys.argv[2])))
"""


def test_trackio_logs_locally_and_offline(tmp_path, lab_cache):
    out = tmp_path / "trackio-run"
    env = {**os.environ, "TRACKIO_DIR": str(tmp_path / "trackio"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           # this tree's library, not whatever copy is installed (docs/testing.md, "Harness rules")
           "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.run([sys.executable, "-c", TRACKIO_RUN,
                           json.dumps(_argv(lab_cache, out, "--report-to", "trackio")), out.name],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, logs = proc.stdout.split("\n}\n")  # the command's JSON summary stays clean on stdout
    assert json.loads(summary + "}")["steps"] == 4
    train = [r for r in read_jsonl(out / "metrics.jsonl") if r["event"] == "train"]
    logged: dict = {}
    for r in json.loads(logs):  # a train and an eval record at one step are two log calls
        logged.setdefault(r["step"], {}).update(r)
    for r in train:
        assert logged[r["step"]]["train/loss"] == pytest.approx(r["loss"])
    assert logged[4]["eval/val_loss"] > 0
    assert (tmp_path / "trackio" / "subspace.db").exists()


@pytest.mark.parametrize("kind", ["tensorboard", "trackio"])
def test_missing_tracker_is_a_one_line_error(tmp_path, lab_cache, capsys, monkeypatch, kind):
    monkeypatch.setitem(trackers.PACKAGES, kind, "no_such_tracker_package")
    assert main(_argv(lab_cache, tmp_path / "x", "--report-to", kind)) == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and f"--report-to {kind} needs the package 'no_such_tracker_package'" \
        in err[0] and f"subspace-optim[{kind}]" in err[0]
    assert not (tmp_path / "x" / "metrics.jsonl").exists()  # before any data was built


def test_scalars_of_a_record():
    rec = {"event": "eval", "step": 3, "val_loss": 2.5, "val_tokens": 10, "note": "x", "p": None}
    assert trackers.scalars(rec) == {"eval/val_loss": 2.5, "eval/val_tokens": 10.0}
