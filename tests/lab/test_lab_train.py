"""The loop: H5 non-finite loss, H8 gradient accumulation, H9 metrics honesty, LR schedule,
overlap records."""
import json
import math
import time

import pytest
import torch

import subspace_lab.train as T
from lab_helpers import lab_cache, make_cfg, params_equal, read_jsonl  # noqa: F401
from subspace_lab import checkpoint as ckpt
from subspace_lab.config import TrainConfig


def _nan_on_call(monkeypatch, call_no: int):
    real, calls = T.lm_nll, {"n": 0}

    def fake(model, x):
        calls["n"] += 1
        nll, n = real(model, x)
        return (nll * float("nan"), n) if calls["n"] == call_no else (nll, n)
    monkeypatch.setattr(T, "lm_nll", fake)


def _keep_models(monkeypatch) -> list:
    built, real = [], T.build_model

    def keep(*a, **k):
        built.append(real(*a, **k))
        return built[-1]
    monkeypatch.setattr(T, "build_model", keep)
    return built


def test_nonfinite_error_aborts_before_update(tmp_path, lab_cache, monkeypatch):  # H5
    clean = T.train(make_cfg(tmp_path / "clean", lab_cache, optim__method="i3s", stop_at=3))
    _nan_on_call(monkeypatch, 4)
    built = _keep_models(monkeypatch)
    cfg = make_cfg(tmp_path / "bad", lab_cache, optim__method="i3s", checkpoint_every=2)
    with pytest.raises(T.NonFiniteLossError, match="step 4.*no update was applied"):
        T.train(cfg)
    assert params_equal(built[0], clean.model)  # the weights are those after step 3
    latest = ckpt.find_latest_valid(tmp_path / "bad" / "checkpoints")
    assert latest.name == "step-000002"         # earlier checkpoint intact, none for step 4
    assert ckpt.load_checkpoint(latest)["trainer"]["step"] == 2


def test_nonfinite_skip_skips_and_counts(tmp_path, lab_cache, monkeypatch):  # H5
    clean = T.train(make_cfg(tmp_path / "clean", lab_cache, optim__method="i3s", stop_at=3))
    _nan_on_call(monkeypatch, 4)
    skipped = T.train(make_cfg(tmp_path / "skip", lab_cache, optim__method="i3s", nonfinite="skip",
                               stop_at=4))
    assert skipped.skipped_steps == 1 and math.isnan(skipped.losses[3])
    assert params_equal(skipped.model, clean.model)
    sa, sb = clean.optimizer.state_dict()["state"], skipped.optimizer.state_dict()["state"]
    assert all(torch.equal(v, sb[p][k]) for p in sa for k, v in sa[p].items()
               if isinstance(v, torch.Tensor))
    _nan_on_call(monkeypatch, 4)
    done = T.train(make_cfg(tmp_path / "skip2", lab_cache, nonfinite="skip"))
    assert done.skipped_steps == 1 and all(math.isfinite(x) for x in done.losses[4:])
    assert read_jsonl(tmp_path / "skip2" / "metrics.jsonl")[-2]["skipped_steps"] == 1


def test_grad_accumulation_matches_big_batch(tmp_path, lab_cache, monkeypatch):  # H8
    grads, real = [], torch.nn.utils.clip_grad_norm_

    def record(params, *a, **k):
        params = list(params)
        grads.append([p.grad.clone() for p in params])
        return real(params, *a, **k)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", record)
    big = T.train(make_cfg(tmp_path / "big", lab_cache, batch_size=8, grad_accum=1, steps=3))
    g_big, grads[:] = grads[:], []
    acc = T.train(make_cfg(tmp_path / "acc", lab_cache, batch_size=4, grad_accum=2, steps=3))
    assert big.losses == pytest.approx(acc.losses, rel=1e-5)
    for a, b in zip(g_big, grads):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
    for (ka, va), vb in zip(big.model.state_dict().items(), acc.model.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-3, atol=1e-4, msg=ka)


def _state_dict_bytes(opt) -> int:
    total = 0
    for per_param in opt.state_dict()["state"].values():
        for v in per_param.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


@pytest.mark.parametrize("name", ["adamw", "galore"])
def test_metrics_honesty(tmp_path, lab_cache, monkeypatch, name):  # H9
    real_eval = T.evaluate

    def slow_eval(*a, **k):
        time.sleep(0.3)
        return real_eval(*a, **k)
    monkeypatch.setattr(T, "evaluate", slow_eval)
    t0 = time.perf_counter()
    res = T.train(make_cfg(tmp_path / "m", lab_cache, optim__method=name, steps=10, eval_every=2,
                           checkpoint_every=2))
    wall = time.perf_counter() - t0
    recs = read_jsonl(tmp_path / "m" / "metrics.jsonl")
    train_recs = [r for r in recs if r["event"] == "train"]
    evals = [r for r in recs if r["event"] == "eval"]
    assert len(evals) == 5 and len(train_recs) == 10
    assert train_recs[-1]["optimizer_state_bytes"] == _state_dict_bytes(res.optimizer)
    assert res.optimizer_state_bytes == _state_dict_bytes(res.optimizer)
    if name == "adamw":  # exp_avg + exp_avg_sq (fp32) + a step scalar per param
        n = sum(p.numel() for p in res.model.parameters())
        assert res.optimizer_state_bytes == 8 * n + 4 * len(list(res.model.parameters()))
    # training time excludes the 1.5 s of (slowed) evaluation and the checkpoint writes
    assert train_recs[-1]["train_time_s"] <= wall - 5 * 0.3
    assert all(r["tokens_per_s"] > 0 for r in train_recs)
    for e in evals:
        assert e["val_ppl"] == pytest.approx(math.exp(e["val_loss"]))


def test_validation_ppl_is_token_weighted(tmp_path, lab_cache):  # H7
    from subspace_lab.data import build_data
    from subspace_lab.distributed import DistInfo
    from subspace_lab.models import build_model, lm_nll
    cfg = make_cfg(tmp_path, lab_cache, eval_batches=3, batch_size=2)
    data = build_data(cfg.data, 0)
    data.val = data.val[:5]  # batches of 2, 2 and 1 sequences
    model = build_model("micro", data.tokenizer.vocab_size)
    ev = T.evaluate(model, data, cfg, DistInfo(), torch.device("cpu"), T.contextlib.nullcontext)
    with torch.no_grad():
        nll, n = lm_nll(model, data.val)
        per_batch = [lm_nll(model, b) for b in data.val_batches(2, 3)]
    assert ev["val_tokens"] == n == 5 * 31
    assert ev["val_loss"] == pytest.approx(nll.item() / n, rel=1e-6)
    mean_of_batch_ppl = sum(math.exp(s.item() / c) for s, c in per_batch) / 3
    assert ev["val_ppl"] != pytest.approx(mean_of_batch_ppl, rel=1e-9)


def _old_lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """The lab's hand-written schedule before it used transformers' (for the comparison below)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.parametrize("total,fraction,min_ratio", [(20, 0.1, 0.1), (600, 0.1, 0.1),
                                                      (100, 0.3, 0.0), (7, 0.0, 1.0),
                                                      (1000, 0.05, 0.037)])
def test_schedule_is_transformers_and_the_old_one_after_warmup(total, fraction, min_ratio):
    cfg = TrainConfig()
    cfg.warmup_fraction, cfg.min_lr_ratio = fraction, min_ratio
    sched = T.lr_schedule(torch.optim.SGD([torch.zeros(1)], lr=1.0), total, cfg)
    factor, warm = sched.lr_lambdas[0], int(round(fraction * total))
    after = range(warm, total + 1)
    assert [factor(s) for s in after] == [_old_lr_factor(s, total, warm, min_ratio) for s in after]
    # the one difference, in warmup: transformers' step s trains at s/W of the peak (0 first),
    # the old schedule at (s + 1)/W
    assert [factor(s) for s in range(warm)] == [s / warm for s in range(warm)]


def test_warmup_cosine_in_a_run(tmp_path, lab_cache):
    T.train(make_cfg(tmp_path / "s", lab_cache, steps=10, warmup_fraction=0.2))
    lrs = [r["lr"] for r in read_jsonl(tmp_path / "s" / "metrics.jsonl") if r["event"] == "train"]
    # the LR after each step (the next step's): warmup 2 steps, then cosine from 1e-2 to 1e-3
    assert lrs[0] == pytest.approx(0.5e-2) and lrs[1] == pytest.approx(1e-2)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] == pytest.approx(1e-3)


def test_overlap_records_per_refresh(tmp_path, lab_cache):
    T.train(make_cfg(tmp_path / "o", lab_cache, optim__method="galore", steps=12))
    recs = read_jsonl(tmp_path / "o" / "overlap.jsonl")
    assert sorted({r["step"] for r in recs}) == [6, 11]        # refreshes at 1, 6, 11
    assert len(recs) == 2 * 14                                  # 7 linears x 2 layers
    values = [r["overlap"] for r in recs]
    # a real overlap of consecutive bases: in range, and not the basis against itself (always 1.0)
    assert all(0.0 < v <= 1.0 + 1e-5 for v in values) and min(values) < 0.99
    T.train(make_cfg(tmp_path / "a", lab_cache, optim__method="adamw", steps=3))
    assert read_jsonl(tmp_path / "a" / "overlap.jsonl") == []


def _huge_eval_loss(monkeypatch):
    """A diverged model: finite training losses, a validation NLL far beyond exp's range."""
    real = T.lm_nll

    def fake(model, x):
        nll, n = real(model, x)
        return (nll * 1e4, n) if not torch.is_grad_enabled() else (nll, n)
    monkeypatch.setattr(T, "lm_nll", fake)


def test_diverged_run_reports_inf_perplexity(tmp_path, lab_cache, monkeypatch):
    _huge_eval_loss(monkeypatch)
    res = T.train(make_cfg(tmp_path / "d", lab_cache, steps=4, checkpoint_every=2))
    assert res.final_val_loss > 1e4 and res.final_val_ppl == math.inf
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_val_ppl"] == math.inf
    assert ckpt.find_latest_valid(tmp_path / "d" / "checkpoints").name == "step-000004"


def test_checkpoint_and_summary_come_before_the_final_evaluation(tmp_path, lab_cache, monkeypatch):
    real_eval = T.evaluate

    def failing_eval(*a, **k):
        raise RuntimeError("evaluation failed (simulated)")
    monkeypatch.setattr(T, "evaluate", failing_eval)
    cfg = make_cfg(tmp_path / "f", lab_cache, steps=4, eval_every=0, checkpoint_every=3)
    with pytest.raises(RuntimeError, match="simulated"):
        T.train(cfg)
    assert ckpt.find_latest_valid(tmp_path / "f" / "checkpoints").name == "step-000004"
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_val_loss"] is None
    assert summary["tokens_per_s"] > 0
    monkeypatch.setattr(T, "evaluate", real_eval)
    cfg.resume = True  # a resume of the finished run redoes only its final evaluation
    res = T.train(cfg)
    assert res.losses == [] and res.final_val_loss is not None
    evals = [r for r in read_jsonl(tmp_path / "f" / "metrics.jsonl") if r["event"] == "eval"]
    assert [e["step"] for e in evals] == [4]
    summary = json.loads((tmp_path / "f" / "summary.json").read_text())
    assert summary["final_val_loss"] == res.final_val_loss and summary["tokens_per_s"] > 0
