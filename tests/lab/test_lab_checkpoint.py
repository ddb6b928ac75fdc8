"""H1 atomic checkpoint, H2 crash mid-write (exception and SIGKILL), H4 keep_last_k."""
import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import torch

from subspace_lab import checkpoint as ckpt

# child processes import this tree's library, not whatever copy is installed (docs/testing.md, "Harness rules")
TREE_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}


def _objs(v: float) -> dict:
    return {"model": {"w": torch.full((4, 4), v)}, "optimizer": {"state": {}, "lr": v},
            "trainer": {"step": int(v), "rng": ckpt.capture_rng()}}


def test_atomic_layout_and_manifest(tmp_path):  # H1
    path = ckpt.save_checkpoint(tmp_path, 123, _objs(1.0))
    assert path.name == "step-000123" and not (tmp_path / "step-000123.tmp").exists()
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "optimizer.pt", "trainer.pt"}
    for name, meta in manifest["files"].items():
        assert (path / name).stat().st_size == meta["size"] and len(meta["sha256"]) == 64
    assert manifest["versions"]["torch"] == torch.__version__
    assert manifest["step"] == 123
    # the manifest is written last: every data file is at least as old as nothing after it
    mtimes = {n: (path / n).stat().st_mtime_ns for n in manifest["files"]}
    assert max(mtimes.values()) <= (path / "manifest.json").stat().st_mtime_ns
    loaded = ckpt.load_checkpoint(path)
    assert torch.equal(loaded["model"]["w"], torch.full((4, 4), 1.0))


def test_dirs_without_valid_manifest_are_ignored(tmp_path):  # H1
    good = ckpt.save_checkpoint(tmp_path, 1, _objs(1.0))
    bad = ckpt.save_checkpoint(tmp_path, 2, _objs(2.0))
    (bad / "manifest.json").unlink()
    (tmp_path / "step-000003").mkdir()
    truncated = ckpt.save_checkpoint(tmp_path, 4, _objs(4.0))
    with open(truncated / "model.pt", "r+b") as f:
        f.truncate(10)
    assert ckpt.find_latest_valid(tmp_path) == good
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        ckpt.load_checkpoint(bad)


def test_corrupt_file_detected_by_sha(tmp_path):
    path = ckpt.save_checkpoint(tmp_path, 5, _objs(5.0))
    data = bytearray((path / "model.pt").read_bytes())
    data[-20] ^= 0xFF
    (path / "model.pt").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        ckpt.load_checkpoint(path)


def test_exception_during_save_loses_nothing(tmp_path, monkeypatch):  # H2 (a)
    first = ckpt.save_checkpoint(tmp_path, 10, _objs(10.0), keep_last_k=1)
    real_save, calls = torch.save, {"n": 0}

    def flaky_save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(OSError, match="simulated"):
        ckpt.save_checkpoint(tmp_path, 20, _objs(20.0), keep_last_k=1)
    monkeypatch.setattr(torch, "save", real_save)
    assert not (tmp_path / "step-000020.tmp").exists()      # the partial folder is removed at once
    assert ckpt.find_latest_valid(tmp_path) == first       # the resume picks the old one
    assert ckpt.load_checkpoint(first)["trainer"]["step"] == 10


def test_sigkill_during_save_loses_nothing(tmp_path):  # H2 (b)
    script = textwrap.dedent(f"""
        import sys, time, torch
        from subspace_lab import checkpoint as ckpt
        objs = {{"model": {{"w": torch.ones(3)}}, "optimizer": {{"x": 1}}, "trainer": {{"step": 1}}}}
        ckpt.save_checkpoint({str(tmp_path)!r}, 1, objs)
        real, n = torch.save, [0]
        def slow_save(obj, f, *a, **k):
            n[0] += 1
            if n[0] == 2:
                print("WRITING", flush=True)
                time.sleep(600)
            return real(obj, f, *a, **k)
        torch.save = slow_save
        ckpt.save_checkpoint({str(tmp_path)!r}, 2, objs)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=TREE_ENV)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (tmp_path / "step-000002.tmp").exists()
    latest = ckpt.find_latest_valid(tmp_path)
    assert latest == tmp_path / "step-000001"
    assert not (tmp_path / "step-000002.tmp").exists()
    assert ckpt.load_checkpoint(latest)["trainer"]["step"] == 1


def test_keep_last_k(tmp_path):  # H4
    for s in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, s, _objs(float(s)), keep_last_k=2)
        kept = [p.name for _, p in ckpt.list_valid(tmp_path)]
        assert kept[-1] == f"step-{s:06d}" and len(kept) == min(s, 2)
    assert [p.name for _, p in ckpt.list_valid(tmp_path)] == ["step-000003", "step-000004"]
    ckpt.purge(tmp_path, 0)  # never deletes the only valid one
    assert [p.name for _, p in ckpt.list_valid(tmp_path)] == ["step-000004"]


def test_resave_same_step_replaces_atomically(tmp_path):
    ckpt.save_checkpoint(tmp_path, 7, _objs(1.0))
    path = ckpt.save_checkpoint(tmp_path, 7, _objs(2.0))
    assert ckpt.load_checkpoint(path)["optimizer"]["lr"] == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000007"]


def test_rng_states_round_trip_weights_only(tmp_path):
    import random

    import numpy as np
    state = ckpt.capture_rng()
    torch.save(state, tmp_path / "rng.pt")
    a = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng(torch.load(tmp_path / "rng.pt", weights_only=True))
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]


def test_sigkill_during_purge_leaves_no_half_deleted_checkpoint(tmp_path):  # H4
    script = textwrap.dedent(f"""
        import os, pathlib, shutil, signal, torch
        from subspace_lab import checkpoint as ckpt
        objs = {{"model": {{"w": torch.ones(3)}}, "optimizer": {{"x": 1}}, "trainer": {{"step": 1}}}}
        ckpt.save_checkpoint({str(tmp_path)!r}, 1, objs, keep_last_k=1)
        def killed_midway(path, *a, **k):  # one file gone, then the kill
            pathlib.Path(path, "optimizer.pt").unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        shutil.rmtree = killed_midway
        ckpt.save_checkpoint({str(tmp_path)!r}, 2, objs, keep_last_k=1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=TREE_ENV)
    assert proc.returncode == -signal.SIGKILL
    assert ckpt.find_latest_valid(tmp_path) == tmp_path / "step-000002"  # cleans on start
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002"]


def test_interrupted_resave_keeps_the_only_copy(tmp_path):
    ckpt.save_checkpoint(tmp_path, 7, _objs(1.0))
    os.replace(tmp_path / "step-000007", tmp_path / "step-000007.old")  # killed between renames
    assert ckpt.find_latest_valid(tmp_path) == tmp_path / "step-000007"
    assert ckpt.load_checkpoint(tmp_path / "step-000007")["optimizer"]["lr"] == 1.0


class _FullDisk:
    """A file whose writes fail with ENOSPC after `room` bytes, like a disk that fills up."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, b):
        self.room -= len(b)
        if self.room < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(b)

    def flush(self):
        self.f.flush()


def test_disk_full_during_save_is_one_clear_error(tmp_path, monkeypatch):
    first = ckpt.save_checkpoint(tmp_path, 10, _objs(10.0), keep_last_k=1)
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f, *a, **k: real_save(obj, _FullDisk(f, 200)))
    with pytest.raises(ckpt.CheckpointWriteError) as info:
        ckpt.save_checkpoint(tmp_path, 20, _objs(20.0), keep_last_k=1)
    msg = str(info.value)
    assert "\n" not in msg and "step-000020" in msg and "No space left on device" in msg
    assert f"the previous checkpoint {first} is intact" in msg
    assert info.value.errno == errno.ENOSPC
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000010"]
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.load_checkpoint(ckpt.find_latest_valid(tmp_path))["trainer"]["step"] == 10
