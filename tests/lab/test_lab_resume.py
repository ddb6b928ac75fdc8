"""H3: a checkpoint holds everything; k steps + resume + (N - k) steps == N steps, bitwise on CPU.
Cuts straddle a subspace refresh (gap 5: refreshes at steps 1, 6, 11)."""
import pytest
import torch

from lab_helpers import lab_cache, make_cfg, params_equal, read_jsonl  # noqa: F401
from subspace_lab import checkpoint as ckpt
from subspace_lab.train import train

N = 12


@pytest.mark.parametrize("opt,k", [("adamw", 7), ("galore", 6), ("i3s", 5), ("i3s", 6)])
def test_bitwise_resume(tmp_path, lab_cache, opt, k):
    full = train(make_cfg(tmp_path / "full", lab_cache, steps=N, optim__method=opt))
    part = train(make_cfg(tmp_path / "cut", lab_cache, steps=N, optim__method=opt, stop_at=k))
    assert len(part.losses) == k
    assert (tmp_path / "cut" / "checkpoints" / f"step-{k:06d}" / "manifest.json").exists()
    torch.manual_seed(12345)  # a different process state: the checkpoint must restore RNGs
    rest = train(make_cfg(tmp_path / "cut", lab_cache, steps=N, optim__method=opt, resume=True))
    assert part.losses + rest.losses == full.losses
    assert params_equal(full.model, rest.model)
    sa, sb = full.optimizer.state_dict(), rest.optimizer.state_dict()
    for pid in sa["state"]:
        for key, v in sa["state"][pid].items():
            w = sb["state"][pid][key]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (pid, key)
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("tokens_per_s", "train_time_s",
                         "peak_memory_mb")} for r in rs]
    assert strip(read_jsonl(tmp_path / "full" / "metrics.jsonl")) == \
        strip(read_jsonl(tmp_path / "cut" / "metrics.jsonl"))


def test_checkpoint_is_complete(tmp_path, lab_cache):
    cfg = make_cfg(tmp_path / "r", lab_cache, steps=4, checkpoint_every=2, optim__method="i3s")
    train(cfg)
    latest = ckpt.find_latest_valid(tmp_path / "r" / "checkpoints")
    assert latest.name == "step-000004"
    state = ckpt.load_checkpoint(latest)  # weights_only=True inside
    assert set(state) == {"model", "optimizer", "scheduler", "trainer"}
    t = state["trainer"]
    assert t["step"] == 4 and t["config"] == cfg.to_dict()
    assert set(t["rng"]) >= {"torch", "numpy", "python"}
    assert t["data"] == {"epoch": 0, "pos": 16}
    assert t["versions"]["torch"] == torch.__version__ and "subspace_lab" in t["versions"]
    assert state["scheduler"]["last_epoch"] == 4


def test_resume_refuses_a_different_config(tmp_path, lab_cache):
    train(make_cfg(tmp_path / "r", lab_cache, steps=6, stop_at=3))
    with pytest.raises(ValueError, match="config differs"):
        train(make_cfg(tmp_path / "r", lab_cache, steps=6, resume=True, optim__lr=0.5))
    with pytest.raises(ValueError, match="--resume"):
        train(make_cfg(tmp_path / "r", lab_cache, steps=6))
