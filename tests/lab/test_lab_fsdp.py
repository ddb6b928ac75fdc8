"""`pretrain --fsdp` under torchrun with 2 gloo processes: a run stopped at step 4 and resumed from
its DCP checkpoint ends bit-identical to the uninterrupted run (weights, every optimizer state
tensor, losses), at the same world size; updates inside backward (`--step-in-backward`) equal ordinary
steps bitwise (docs/fsdp.md)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

SRC = Path(__file__).resolve().parents[2] / "src"
ARGS = ["--model", "micro", "--max-docs", "40", "--vocab-size", "512", "--seq-len", "32",
        "--batch-size", "2", "--rank", "4", "--update-proj-gap", "3", "--eval-every", "0",
        "--eval-batches", "1", "--threads", "1", "--no-progress", "--fsdp", "--steps", "8",
        "--checkpoint-every", "4", "--log-every", "1"]


def pretrain(out: Path, optimizer: str, *extra: str) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "subspace_lab.cli", "pretrain", *ARGS, "--optimizer", optimizer, "--out-dir", str(out),
           *extra]
    # this tree's library, not whatever copy is installed (docs/testing.md, "Harness rules")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=out.parent)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]


def flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def saved(run: Path, step: int, scratch: Path) -> dict:
    """The whole (unsharded) model and optimizer state of a checkpoint, read back from its DCP shards."""
    target = scratch / f"{run.name}-{step}.pt"
    dcp_to_torch_save(str(run / "checkpoints" / f"step-{step:06d}" / "dcp"), str(target))
    return flat(torch.load(target, weights_only=False))


def train_losses(run: Path) -> list[float]:
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [l["loss"] for l in lines if l.get("event") == "train"]


# (LDAdam is left out: resumed under the lab's --fsdp it drifts from the uninterrupted run at
# ~1e-7 from the first step after the resume, while tests/test_fsdp.py's DCP round trip of LDAdam
# is bitwise; not yet explained, see docs/fsdp.md, "Limits")
@pytest.mark.parametrize("optimizer", ["i3s", "galore"])
def test_fsdp_run_resumes_bit_identically(tmp_path, optimizer):
    pretrain(tmp_path / "full", optimizer)
    pretrain(tmp_path / "part", optimizer, "--stop-at", "4")
    assert not (tmp_path / "part" / "checkpoints" / "step-000008").exists()
    pretrain(tmp_path / "part", optimizer, "--resume")

    full, part = saved(tmp_path / "full", 8, tmp_path), saved(tmp_path / "part", 8, tmp_path)
    assert full.keys() == part.keys()
    states = [k for k in full if k.startswith("optimizer.state.") and isinstance(full[k], torch.Tensor)]
    assert any(k.endswith(".projector") for k in states) and any(k.endswith(".exp_avg") for k in states)
    for key, value in full.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, part[key]), key
        else:
            assert value == part[key], key
    assert train_losses(tmp_path / "full") == train_losses(tmp_path / "part")
    assert len(train_losses(tmp_path / "full")) == 8
    # the 4 steps after the resume changed the weights (the equality above is not of untouched copies)
    middle = saved(tmp_path / "part", 4, tmp_path)
    weights = [k for k in full if k.startswith("model.") and k.endswith("q_proj.weight")]
    assert weights and not any(torch.equal(full[k], middle[k]) for k in weights)


def test_fsdp_updates_in_backward_equal_ordinary_steps(tmp_path):
    # without clipping (in backward, --clip clips each parameter on its own: docs/memory.md)
    pretrain(tmp_path / "ordinary", "i3s", "--clip", "0")
    pretrain(tmp_path / "in_backward", "i3s", "--clip", "0", "--step-in-backward")
    ordinary, in_backward = saved(tmp_path / "ordinary", 8, tmp_path), saved(tmp_path / "in_backward", 8, tmp_path)
    assert ordinary.keys() == in_backward.keys()
    for key, value in ordinary.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, in_backward[key]), key
    assert train_losses(tmp_path / "ordinary") == train_losses(tmp_path / "in_backward")
