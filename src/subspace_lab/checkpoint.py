"""Atomic checkpoints that only count once complete (testing.md H1-H4; torchtitan's rule).

A save writes every file into `step-000123.tmp/` and fsyncs it, writes `manifest.json` (file
sizes, sha256, library versions) LAST and fsyncs it, then `os.replace`s the folder to
`step-000123/` and fsyncs the parent. A folder without a valid manifest never counts: a crash at
any moment leaves the previous checkpoint as the latest valid one. `keep_last_k` purges old
checkpoints only after the new one is committed, and renames each to `step-000123.deleting/`
before deleting it, so a kill mid-purge never leaves a half-deleted `step-*` folder that looks
like a checkpoint. `clean_leftovers` (run at every start) removes `.tmp` and `.deleting` folders.
A failed write (disk full) raises `CheckpointWriteError` naming the reason; the partial folder is
removed at once and the previous checkpoint stays the latest valid one. The steps are public
(`begin`, `commit`, `failed`) so that several writers can fill one folder: under FSDP every rank
writes its shard files (`sharded_checkpoint.py`) between `begin` and rank 0's `commit`, and the
manifest covers them all (by path relative to the folder).
Everything loads with `torch.load(weights_only=True)`: only tensors and plain Python values.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

MANIFEST = "manifest.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^(step-\d+)\.(tmp|old|deleting)$")


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only folder, ...)."""


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "torch": str(torch.__version__)}
    for mod in ("transformers", "subspace_optim", "subspace_lab"):
        try:
            m = __import__(mod)
            out[mod] = str(getattr(m, "__version__", "unknown"))
        except ImportError:
            out[mod] = "missing"
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def save_checkpoint(root: str | Path, step: int, objects: dict[str, object],
                    keep_last_k: int | None = None) -> Path:
    """Write `objects` (name -> picklable tensors/plain values) atomically as checkpoint `step`."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = temp_dir(final)
    try:
        begin(root, tmp)
        commit(root, final, tmp, step, objects)
    except Exception as e:  # noqa: BLE001 - torch reports a failed write as RuntimeError
        raise failed(root, final, tmp, e) from e
    if keep_last_k is not None:
        purge(root, keep_last_k)
    return final


def temp_dir(final: Path) -> Path:
    return final.with_name(final.name + ".tmp")


def begin(root: Path, tmp: Path) -> None:
    """An empty temporary folder for a new checkpoint (other writers, such as every rank's
    sharded files, may fill it before `commit`)."""
    root.mkdir(parents=True, exist_ok=True)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()


def failed(root: Path, final: Path, tmp: Path, e: BaseException) -> "CheckpointWriteError":
    """Remove the partial folder (free the space it took) and describe the failure."""
    shutil.rmtree(tmp, ignore_errors=True)
    return _write_error(root, final, e)


def commit(root: Path, final: Path, tmp: Path, step: int, objects: dict[str, object]) -> None:
    """Write `objects` as `<name>.pt` into `tmp`, then the manifest over EVERY file in it (those
    of other writers included, by relative path), then rename `tmp` to `final`."""
    for name, obj in objects.items():
        with open(tmp / f"{name}.pt", "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    files = {path.relative_to(tmp).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
             for path in sorted(tmp.rglob("*")) if path.is_file()}
    manifest = {"format": 1, "step": step, "files": files, "versions": versions(),
                "created_unix": time.time()}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for sub in [p for p in tmp.rglob("*") if p.is_dir()] + [tmp]:
        _fsync_dir(sub)
    if final.exists():  # re-saving a step (e.g. after a resume): set the old copy aside first
        old = final.with_name(final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)


def _write_error(root: Path, final: Path, e: BaseException) -> CheckpointWriteError:
    """One line: what failed, why (the OSError torch wraps, if any), free space, what is kept."""
    cause: BaseException | None = e
    while cause is not None and not isinstance(cause, OSError):
        cause = cause.__cause__ or cause.__context__
    code = getattr(cause, "errno", None)
    reason = os.strerror(code) if code else str(cause or e).strip().splitlines()[0]
    try:
        free = f"; {shutil.disk_usage(root).free / 2**20:.0f} MiB free there"
    except OSError:
        free = ""
    valid = list_valid(root)
    kept = f"the previous checkpoint {valid[-1][1]} is intact" if valid else "no earlier checkpoint"
    err = CheckpointWriteError(f"could not write checkpoint {final}: {reason}{free}; {kept}")
    err.errno = code
    return err


def why_invalid(path: Path) -> str | None:
    """None if the folder is a complete checkpoint (manifest present, every file of the size it
    lists), else the reason in a few words."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for name, meta in manifest["files"].items():
            size = (path / name).stat().st_size
            if size != meta["size"]:
                return f"{name} has {size} bytes, manifest says {meta['size']}"
        return None
    except FileNotFoundError as e:
        return f"no {Path(e.filename).name}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"unreadable {MANIFEST} ({type(e).__name__})"


def read_manifest(path: Path) -> dict | None:
    """The manifest if the folder is a complete checkpoint (all files present, sizes match)."""
    if why_invalid(path) is not None:
        return None
    return json.loads((path / MANIFEST).read_text())


def list_valid(root: str | Path) -> list[tuple[int, Path]]:
    root = Path(root)
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and read_manifest(p) is not None:
            out.append((int(m.group(1)), p))
    return sorted(out)


def describe(root: str | Path) -> str:
    """What a checkpoint folder holds, for error messages: 'step-000005 (no manifest.json), ...'."""
    root = Path(root)
    if not root.is_dir():
        return f"{root} does not exist"
    entries = sorted(root.iterdir())
    if not entries:
        return f"{root} is empty"
    parts = []
    for p in entries:
        reason = why_invalid(p) if _STEP_DIR.match(p.name) and p.is_dir() else "not a checkpoint"
        parts.append(f"{p.name} ({reason or 'valid'})")
    return f"{root} holds " + ", ".join(parts)


def clean_leftovers(root: str | Path) -> None:
    """Remove what an interrupted save or purge left (`step-*.tmp`, `step-*.deleting`). A
    `step-*.old` whose step folder is missing is the only copy of that step (a kill between the
    two renames of a re-save) and is moved back; otherwise it is removed."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in root.iterdir():
        m = _LEFTOVER.match(p.name)
        if not m or not p.is_dir():
            continue
        final = root / m.group(1)
        if m.group(2) == "old" and not final.exists() and read_manifest(p) is not None:
            os.replace(p, final)
        else:
            shutil.rmtree(p, ignore_errors=True)


def find_latest_valid(root: str | Path, clean: bool = True) -> Path | None:
    """The newest complete checkpoint under `root`, or None. With `clean`, leftovers of an
    interrupted save or purge are removed first (`clean_leftovers`)."""
    if clean:
        clean_leftovers(root)
    valid = list_valid(root)
    return valid[-1][1] if valid else None


def purge(root: str | Path, keep_last_k: int) -> None:
    """Delete all but the newest `keep_last_k` (>= 1) valid checkpoints. Each is renamed to
    `*.deleting` first: a kill during the deletion leaves a folder no one takes for a checkpoint."""
    root = Path(root)
    keep_last_k = max(1, keep_last_k)
    for _, p in list_valid(root)[:-keep_last_k]:
        doomed = p.with_name(p.name + ".deleting")
        os.replace(p, doomed)
        _fsync_dir(root)
        shutil.rmtree(doomed, ignore_errors=True)


def load_checkpoint(path: str | Path, verify: bool = True,
                    only: tuple[str, ...] | None = None) -> dict[str, object]:
    """Load every `<name>.pt` file of a checkpoint, or the `only` ones (`weights_only=True`, on
    CPU); verify sha256 first. Files in subfolders (sharded state) are `verify_files`' business."""
    path = Path(path)
    manifest = _complete(path)
    out = {}
    for name, meta in manifest["files"].items():
        if "/" in name or not name.endswith(".pt") or (only is not None and name[:-3] not in only):
            continue
        if verify and _sha256(path / name) != meta["sha256"]:
            raise ValueError(f"checkpoint file {path / name} is corrupt (sha256 mismatch)")
        out[name[:-3]] = torch.load(path / name, weights_only=True, map_location="cpu")
    return out


def verify_files(path: str | Path, under: str) -> None:
    """Check the sha256 of every file the manifest lists below the subfolder `under`."""
    path = Path(path)
    for name, meta in _complete(path)["files"].items():
        if name.startswith(under.rstrip("/") + "/") and _sha256(path / name) != meta["sha256"]:
            raise ValueError(f"checkpoint file {path / name} is corrupt (sha256 mismatch)")


def _complete(path: Path) -> dict:
    manifest = read_manifest(path)
    if manifest is None:
        raise ValueError(f"{path} is not a complete checkpoint (missing or invalid {MANIFEST})")
    return manifest


# ---- RNG states as weights_only-safe values ------------------------------------------------
def capture_rng() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["gauss"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
