"""The lab with updates inside backward, accumulation in the subspace and 8-bit states."""
import pytest

import subspace_lab.in_backward_step as IB
import subspace_lab.train as T
from lab_helpers import lab_cache, make_cfg, params_equal, read_jsonl  # noqa: F401


def _losses(result):
    return result.losses


def test_in_backward_run_equals_ordinary_run(tmp_path, lab_cache):
    common = dict(optim__method="i3s", clip=0.0, steps=6, eval_every=0)
    plain = T.train(make_cfg(tmp_path / "plain", lab_cache, **common))
    inside = T.train(make_cfg(tmp_path / "inside", lab_cache, step_in_backward=True, **common))
    assert plain.losses == inside.losses and plain.final_val_loss == inside.final_val_loss
    assert params_equal(plain.model, inside.model)
    assert read_jsonl(tmp_path / "inside" / "metrics.jsonl")[0]["grad_norm"] is None


def test_accumulation_in_the_subspace_matches_ordinary_accumulation(tmp_path, lab_cache):
    common = dict(optim__method="galore", clip=0.0, steps=6, eval_every=0, grad_accum=2)
    plain = T.train(make_cfg(tmp_path / "plain", lab_cache, **common))
    inside = T.train(make_cfg(tmp_path / "inside", lab_cache, step_in_backward=True, **common))
    assert inside.losses == pytest.approx(plain.losses, rel=1e-4)


def test_8bit_states_resume_bitwise(tmp_path, lab_cache):
    common = dict(optim__method="i3s", optim__state_bits=8, optim__projector_bits=16, step_in_backward=True,
                  steps=8, eval_every=0, checkpoint_every=4)
    full = T.train(make_cfg(tmp_path / "full", lab_cache, **common))
    T.train(make_cfg(tmp_path / "cut", lab_cache, stop_at=4, **common))
    resumed = T.train(make_cfg(tmp_path / "cut", lab_cache, resume=True, **common))
    assert params_equal(full.model, resumed.model) and full.losses[4:] == resumed.losses


def test_nonfinite_skip_in_backward_counts_and_continues(tmp_path, lab_cache, monkeypatch):
    real, calls = IB.lm_nll, {"n": 0}

    def nan_on_third(model, x):
        calls["n"] += 1
        nll, n = real(model, x)
        return (nll * float("nan"), n) if calls["n"] == 3 else (nll, n)
    monkeypatch.setattr(IB, "lm_nll", nan_on_third)
    result = T.train(make_cfg(tmp_path / "skip", lab_cache, optim__method="i3s", step_in_backward=True,
                              nonfinite="skip", steps=5, eval_every=0))
    assert result.skipped_steps == 1 and len(result.losses) == 5


def test_bad_combinations_are_refused(tmp_path, lab_cache):
    with pytest.raises(ValueError, match="--clip 0"):
        T.train(make_cfg(tmp_path / "a", lab_cache, optim__method="i3s", step_in_backward=True, grad_accum=2))
    with pytest.raises(ValueError, match="subspace optimizer"):
        T.train(make_cfg(tmp_path / "b", lab_cache, optim__method="adamw", step_in_backward=True))
    with pytest.raises(ValueError, match="state_bits"):
        T.train(make_cfg(tmp_path / "c", lab_cache, optim__method="adamw", optim__state_bits=8))
