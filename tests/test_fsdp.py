"""FSDP2 (``fully_shard``) with 2 and 4 gloo processes: the sharded optimizer follows the whole one,
every process holds the same bases, state is DTensors placed like the weights, ordinary steps move
only what the math needs, DCP checkpoints reshard, and the non-finite policy holds across processes.
The jobs run under ``torchrun`` in ``fsdp_worker.py``.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
SRC = TESTS.parent / "src"
PRESETS = ["galore", "galore_gram", "i3s_randomized", "i3s", "i3s_rotate", "osd", "ldadam", "random_reset", "galore_lion", "galore_full"]


def run_job(job: str, world: int, out_dir: Path, presets=PRESETS) -> list:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(TESTS)]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(TESTS / "fsdp_worker.py"), job, str(out_dir), ",".join(presets)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return torch.load(out_dir / f"{job}-{world}.pt", weights_only=False)


@functools.lru_cache(maxsize=None)
def equivalence(world: int, tmp: str):
    return run_job("equivalence", world, Path(tmp))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    return tmp_path_factory.mktemp("fsdp")


def close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> None:
    torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * max(1.0, float(b.abs().max())))


@pytest.mark.parametrize("world", [2, 4])
def test_sharded_optimizer_follows_the_whole_one(world, scratch):
    results = equivalence(world, str(scratch / f"eq{world}"))
    for name in PRESETS:
        r = results[0][name]
        for sharded, whole in zip(r["sharded"], r["whole"]):
            close(sharded, whole, 1e-5)
        # the overlap diagnostic is computed across shards, like the whole weight's
        for a, b in zip(r["overlaps"], r["overlaps_whole"]):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5), name


@pytest.mark.parametrize("world", [2, 4])
def test_every_process_holds_bitwise_the_same_basis(world, scratch):
    results = equivalence(world, str(scratch / f"eq{world}"))
    for name in PRESETS:
        by_rank = results[0][name]["bases_by_rank"]
        if name != "galore_full":  # (two-sided: every weight is in left form, its rows sharded)
            # the (12, 7) weight projects right: its whole basis lives on every process
            assert all(torch.equal(bases[1], by_rank[0][1]) for bases in by_rank), name
        # left-projected weights hold their own rows: together, the whole orthonormal basis
        for i in ((0, 1, 2) if name == "galore_full" else (0, 2)):
            basis = torch.cat([bases[i] for bases in by_rank])
            close(basis.T @ basis, torch.eye(basis.shape[1]), 1e-5)


def test_state_is_dtensors_placed_like_what_they_describe(scratch):
    placements = equivalence(2, str(scratch / "eq2"))[0]["ldadam"]["placements"]
    # weight 0 (7, 10) projects left: basis rows sharded, moments (r, 10) replicated
    assert placements["0.projector"] == "(Shard(dim=0),)" and placements["0.exp_avg"] == "(Replicate(),)"
    # weight 2 (12, 7) projects right: basis replicated, moments (r, 12) sharded by columns
    assert placements["2.projector"] == "(Replicate(),)" and placements["2.exp_avg"] == "(Shard(dim=1),)"
    assert placements["2.error_buffer"] == "(Shard(dim=0),)"  # like the weight


@pytest.mark.parametrize("world", [2, 4])
def test_ordinary_steps_move_only_the_projected_gradients_of_left_projections(world, scratch):
    results = equivalence(world, str(scratch / f"eq{world}"))
    for name in ("galore", "i3s", "random_reset"):
        # left projections all-reduce R = P^T G (r, l) in fp32: (3, 10) and (3, 12); the right
        # projection (12, 7) moves nothing; no gradient, weight or moment is gathered
        assert results[0][name]["last_step_bytes"] == {"step": (3 * 10 + 3 * 12) * 4}, name


def test_dcp_checkpoint_resumes_at_the_same_and_other_world_sizes(scratch):
    names = ["galore", "i3s_rotate", "osd", "ldadam"]
    reference = run_job("dcp_save", 2, scratch / "dcp", names)[0]
    for world, tol in ((2, 0.0), (1, 1e-5), (4, 1e-5)):
        resumed = run_job("dcp_load", world, scratch / "dcp", names)[0]
        for name in names:
            for a, b in zip(resumed[name], reference[name]):
                if tol == 0.0:
                    assert torch.equal(a, b), (world, name)
                else:
                    close(a, b, tol)


def test_nonfinite_policy_is_one_decision_on_every_process(scratch):
    results = run_job("nonfinite", 2, scratch / "nonfinite", ["galore"])
    messages = {r["error"]["message"] for r in results}
    assert len(messages) == 1 and "non-finite gradient in parameter 2.weight" in messages.pop()
    assert all(r["error"]["unchanged"] and r["skip"]["unchanged"] and r["skip"]["skipped"] == 1 for r in results)
