"""--dense-lr: the parameters outside the target modules (embeddings, LM head, norms) train at
their own peak lr, for AdamW as for the subspace methods, and the schedule scales both alike."""
import pytest
import torch

from subspace_lab.config import OptimConfig
from subspace_lab.models import build_model
from subspace_lab.optimizers import build_optimizer
from subspace_lab.train import lr_schedule


def _lrs_by_name(opt, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["lr"] for g in opt.param_groups for p in g["params"]}


@pytest.mark.parametrize("method", ["adamw", "galore", "i3s"])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_dense_parameters_take_dense_lr(method, weight_decay):
    model = build_model("micro", 512)
    opt = build_optimizer(OptimConfig(method=method, lr=1e-3, dense_lr=2e-2, rank=4,
                                      weight_decay=weight_decay), model)
    lrs = _lrs_by_name(opt, model)
    assert len(lrs) == len(list(model.parameters()))  # every parameter once
    for name, lr in lrs.items():
        matrix = name.endswith("proj.weight")  # the attention/MLP linears: the target modules
        assert lr == (1e-3 if matrix else 2e-2), name
    assert lrs["model.embed_tokens.weight"] == 2e-2


def test_without_dense_lr_adamw_is_one_group_at_lr():
    model = build_model("micro", 512)
    opt = build_optimizer(OptimConfig(method="adamw", lr=1e-3), model)
    assert [g["lr"] for g in opt.param_groups] == [1e-3]
    assert len(opt.param_groups[0]["params"]) == len(list(model.parameters()))


def test_schedule_scales_both_learning_rates():
    model = build_model("micro", 512)
    opt = build_optimizer(OptimConfig(method="adamw", lr=1e-3, dense_lr=2e-2), model)
    from subspace_lab.config import TrainConfig

    sched = lr_schedule(opt, 20, TrainConfig())
    for _ in range(7):
        opt.step()
        sched.step()
    dense, matrix = (g["lr"] for g in opt.param_groups)
    assert dense / matrix == pytest.approx(20.0, rel=1e-12)
    assert 0.1 * 2e-2 < dense < 2e-2


def test_dense_lr_must_be_positive():
    from subspace_lab.config import TrainConfig

    cfg = TrainConfig()
    cfg.optim.dense_lr = 0.0
    with pytest.raises(ValueError, match="dense_lr"):
        cfg.validate()
