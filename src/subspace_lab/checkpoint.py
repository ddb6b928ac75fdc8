"""Atomic checkpoints that only count once complete (testing.md H1-H4; torchtitan's rule).

A save writes every file into `step-000123.tmp/` and fsyncs it, writes `manifest.json` (file
sizes, sha256, library versions) LAST and fsyncs it, then `os.replace`s the folder to
`step-000123/` and fsyncs the parent. A folder without a valid manifest never counts: a crash at
any moment leaves the previous checkpoint as the latest valid one, and `find_latest_valid` removes
the leftovers. `keep_last_k` purges old checkpoints only after the new one is committed.
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
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    for name, obj in objects.items():
        path = tmp / f"{name}.pt"
        with open(path, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": 1, "step": step, "files": files, "versions": versions(),
                "created_unix": time.time()}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
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
    if keep_last_k is not None:
        purge(root, keep_last_k)
    return final


def read_manifest(path: Path) -> dict | None:
    """The manifest if the folder is a complete checkpoint (all files present, sizes match)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        for name, meta in manifest["files"].items():
            if (path / name).stat().st_size != meta["size"]:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


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


def find_latest_valid(root: str | Path, clean: bool = True) -> Path | None:
    """The newest complete checkpoint under `root`, or None. With `clean`, partial folders
    (`*.tmp`, `*.old`) left by a crash are removed."""
    root = Path(root)
    if clean and root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and p.suffix in (".tmp", ".old"):
                shutil.rmtree(p, ignore_errors=True)
    valid = list_valid(root)
    return valid[-1][1] if valid else None


def purge(root: str | Path, keep_last_k: int) -> None:
    """Delete all but the newest `keep_last_k` (>= 1) valid checkpoints."""
    keep_last_k = max(1, keep_last_k)
    for _, p in list_valid(root)[:-keep_last_k]:
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: str | Path, verify: bool = True) -> dict[str, object]:
    """Load every file of a checkpoint (`weights_only=True`, on CPU); verify sha256 first."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest is None:
        raise ValueError(f"{path} is not a complete checkpoint (missing or invalid {MANIFEST})")
    out = {}
    for name, meta in manifest["files"].items():
        if verify and _sha256(path / name) != meta["sha256"]:
            raise ValueError(f"checkpoint file {path / name} is corrupt (sha256 mismatch)")
        out[name[:-3]] = torch.load(path / name, weights_only=True, map_location="cpu")
    return out


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
