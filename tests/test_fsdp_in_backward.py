"""Updates inside backward on an FSDP2 (``fully_shard``) model with 2 gloo processes: the same
weights as ordinary FSDP2 steps of the same optimizer, with one micro-batch per step and with 2
accumulated in the subspace, across refreshes (rank 3, a refresh every 4 steps, 10 steps); the same
collectives; a state-dict round trip; clipping per parameter and global (``two_pass``); one
non-finite decision on every process. The job runs under ``torchrun`` (``fsdp_worker.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from test_fsdp import close, run_job

PRESETS = ["galore", "i3s", "osd", "ldadam"]
N_PARAMS = 6  # three Linear layers: weight and bias each
WINDOWS = 10


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_job("in_backward", 2, Path(tmp_path_factory.mktemp("fsdp_in_backward")), PRESETS)


def rank0(results):
    return results[0]


@pytest.mark.parametrize("name", PRESETS)
def test_one_micro_batch_equals_ordinary_fsdp2_steps(results, name):
    r = rank0(results)[name]
    # bitwise: the hooks run the step's own per-parameter code on the same local shards
    for a, b in zip(r["in_backward1"], r["ordinary1"]):
        assert torch.equal(a, b), name
    assert r["in_backward1_counts"] == [0, 0, 0]  # no gradient outlived its backward; every backward updated
    assert r["in_backward1_skipped"] == 0
    # the same collectives: left projections all-reduce R = P^T G once, right projections nothing
    assert r["in_backward1_bytes"] == r["ordinary1_bytes"] and sum(r["ordinary1_bytes"].values()) > 0


@pytest.mark.parametrize("name", PRESETS)
def test_two_micro_batches_equal_ordinary_fsdp2_accumulation(results, name):
    r = rank0(results)[name]
    for a, b in zip(r["in_backward2"], r["ordinary2"]):
        close(a, b, 1e-5)
    left, idle, held = r["in_backward2_counts"]
    assert left == 0 and idle == 0
    if name in ("galore", "i3s"):
        # refresh windows (steps 0, 4, 8) hold every full gradient after the first micro-batch; the
        # 7 others only the 3 biases: the weights' micro-batch gradients were projected and freed
        assert held == 3 * N_PARAMS + 7 * 3
        assert r["in_backward2_bytes"] == {"step": (3 * 10 + 3 * 12) * 4}  # one all-reduce per window
    else:  # OSD and LDAdam read the full gradient every step
        assert held == WINDOWS * N_PARAMS
    assert r["in_backward2_bytes"] == r["ordinary2_bytes"]
    # the state followed too (step counters, moments, bases)
    for s_ib, s_ord in zip(r["in_backward2_state"], r["ordinary2_state"]):
        assert s_ib.keys() == s_ord.keys()
        for key, value in s_ord.items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                close(s_ib[key], value, 1e-5)
            elif isinstance(value, torch.Tensor):
                assert torch.equal(s_ib[key], value), key
            elif isinstance(value, float):  # the overlap diagnostic
                assert s_ib[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
            else:
                assert s_ib[key] == value, key


@pytest.mark.parametrize("name", PRESETS)
def test_state_after_one_micro_batch_is_the_ordinary_state(results, name):
    r = rank0(results)[name]
    for s_ib, s_ord in zip(r["in_backward1_state"], r["ordinary1_state"]):
        assert s_ib.keys() == s_ord.keys() and s_ord
        for key, value in s_ord.items():
            assert torch.equal(s_ib[key], value) if isinstance(value, torch.Tensor) else s_ib[key] == value, key


@pytest.mark.parametrize("name", PRESETS)
def test_state_dict_round_trip_resumes_bitwise(results, name):
    r = rank0(results)[name]
    for a, b in zip(r["resumed"], r["in_backward1"]):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("clip", ["per_parameter", "global"])
def test_clipping_equals_ordinary_clipping(results, clip):
    r = rank0(results)["clip"]
    # per parameter: the whole parameter's norm (all-reduced); global: two_pass=True, every
    # parameter's whole norm, vs torch's clip_grad_norm_ on the DTensor gradients
    for a, b in zip(r[f"in_backward_{clip}"], r[f"ordinary_{clip}"]):
        close(a, b, 1e-6)
    assert r[f"in_backward_{clip}_counts"] == (0, 0, 0)
    # the clipping is active: the clipped run is not the unclipped one
    unclipped = rank0(results)["galore"]["ordinary1"]
    assert not all(torch.allclose(a, b, rtol=1e-4) for a, b in zip(r[f"ordinary_{clip}"], unclipped))


def test_nonfinite_shard_is_one_decision_on_every_process(results):
    # skip: a NaN in the last rank's shard of the first gradient to arrive: every process skips the
    # step, changes nothing, and goes on like the ordinary skipping FSDP2 run
    for r in results:
        runs = r["nonfinite"]["skip"]
        for mode in ("ordinary", "in_backward"):
            assert runs[mode]["message"] is None and runs[mode]["skipped"] == 1
            assert runs[mode]["unchanged"] == [True] * N_PARAMS
        for a, b in zip(runs["in_backward"]["weights"], runs["ordinary"]["weights"]):
            assert torch.equal(a, b)
    # error: every process raises, naming the same parameter, nothing changed
    messages = {r["nonfinite"]["error"]["in_backward"]["message"] for r in results}
    assert len(messages) == 1
    message = messages.pop()
    assert "NonFiniteGradientError" in message and "non-finite gradient in parameter 4.weight" in message
    assert all(r["nonfinite"]["error"]["in_backward"]["unchanged"] == [True] * N_PARAMS for r in results)
    # torn: the NaN arrives after 4 parameters were updated: every process raises the torn step
    messages = {r["nonfinite"]["torn"]["in_backward"]["message"] for r in results}
    assert len(messages) == 1 and "torn" in messages.pop()
    assert all(r["nonfinite"]["torn"]["in_backward"]["unchanged"] == [True, True] + [False] * 4 for r in results)
