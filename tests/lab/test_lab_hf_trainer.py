"""Our optimizers inside the Hugging Face Trainer, configured by TrainingArguments: train,
checkpoint, resume_from_checkpoint, and continue identically (the Trainer loads optimizer.pt with
weights_only=True)."""
import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from subspace_lab.hf_trainer import (SubspaceTrainer, build_trainer_optimizer,  # noqa: E402
                                    trainer_cls_and_kwargs)
from subspace_lab.models import build_model  # noqa: E402

VOCAB = 128


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48, seq=16):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, VOCAB, (n, seq), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _args(out, max_steps=6, **kw):
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, save_steps=3,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, warmup_steps=1,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        disable_tqdm=True, dataloader_num_workers=0, save_only_model=False)
    return TrainingArguments(**{**settings, **kw})


def _trainer(out, max_steps, how):
    from transformers import Trainer

    model = build_model("micro", VOCAB, seed=0)
    if how == "SubspaceTrainer":
        args = _args(out, max_steps, learning_rate=1e-2, weight_decay=0.1,
                     optim_args="method=i3s,rank=4,update_proj_gap=2,svd_method=gram")
        return SubspaceTrainer(model=model, args=args, train_dataset=Tokens())
    args = _args(out, max_steps)
    opts = dict(lr=1e-2, rank=4, update_proj_gap=2)
    if how == "instance":
        kw = {"optimizers": (build_trainer_optimizer(model, "i3s", **opts), None)}
    else:
        kw = {"optimizer_cls_and_kwargs": trainer_cls_and_kwargs(model, "galore", **opts)}
    return Trainer(model=model, args=args, train_dataset=Tokens(), **kw)


class StopAt:
    def __new__(cls, step):
        from transformers import TrainerCallback

        class _Stop(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step >= step:
                    control.should_training_stop = True
                return control
        return _Stop()


def _losses(trainer):
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


@pytest.mark.parametrize("how", ["instance", "cls_and_kwargs", "SubspaceTrainer"])
def test_trainer_resume_is_identical(tmp_path, how):
    full = _trainer(tmp_path / "full", 6, how)
    full.train()
    cut = _trainer(tmp_path / "cut", 6, how)  # same 6-step schedule, interrupted after step 3
    cut.add_callback(StopAt(3))
    cut.train()
    assert (tmp_path / "cut" / "checkpoint-3" / "optimizer.pt").exists()
    resumed = _trainer(tmp_path / "cut", 6, how)
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert type(resumed.optimizer.optimizer if hasattr(resumed.optimizer, "optimizer")
                else resumed.optimizer).__name__ in ("I3SAdamW", "GaLoreAdamW")
    lf, lr = _losses(full), _losses(resumed)
    assert all(lf[s] == lr[s] for s in (4, 5, 6)), (lf, lr)
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


def _groups(opt) -> list[dict]:
    opt = getattr(opt, "optimizer", opt)  # the Trainer may wrap it (accelerate)
    return opt.param_groups


def test_subspace_trainer_takes_everything_from_training_arguments(tmp_path):
    model = build_model("micro", VOCAB, seed=0)
    args = _args(tmp_path, learning_rate=5e-4, weight_decay=0.1, adam_beta1=0.8, adam_beta2=0.95,
                 adam_epsilon=1e-7, seed=3, optim_target_modules=["q_proj", r"model\.layers\.1\..*"],
                 optim_args="method=i3s,rank=8,update_proj_gap=50,scale=0.5,svd_method=gram")
    trainer = SubspaceTrainer(model=model, args=args, train_dataset=Tokens())
    opt = trainer.create_optimizer()
    assert type(opt).__name__ == "I3SAdamW"
    decay = set(trainer.get_decay_parameter_names(model))
    for g in _groups(opt):
        assert (g["lr"], g["betas"], g["eps"], g["seed"]) == (5e-4, (0.8, 0.95), 1e-7, 3)
        names = g["param_names"]
        # weight decay exactly on the parameters the Trainer decays
        assert g["weight_decay"] == (0.1 if names[0] in decay else 0.0)
        assert all((n in decay) == (g["weight_decay"] > 0) for n in names)
        if g["subspace"]:
            assert (g["rank"], g["update_proj_gap"], g["scale"], g["svd_method"]) == (8, 50, 0.5, "gram")
    projected = sorted(n for g in _groups(opt) if g["subspace"] for n in g["param_names"])
    # the Trainer's matching: "q_proj" as a substring, the regex on layer 1's linears
    expected = sorted({"model.layers.0.self_attn.q_proj.weight"}
                      | {f"model.layers.1.{m}.weight" for m in (
                          "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")})
    assert projected == expected


def test_helpers_take_training_arguments_and_refuse_contradictions(tmp_path):
    """The issue's case: the helper used to train at its own lr 1e-2 and no weight decay while
    the Trainer's arguments said 5e-4 and 0.1."""
    model = build_model("micro", VOCAB, seed=0)
    args = _args(tmp_path, learning_rate=5e-4, weight_decay=0.1)
    cls, kw = trainer_cls_and_kwargs(model, "galore", args=args, rank=4)
    assert cls.__name__ == "GaLoreAdamW" and kw["lr"] == 5e-4
    assert {g["weight_decay"] for g in kw["params"]} == {0.1, 0.0}
    opt = build_trainer_optimizer(model, "i3s", args=args, lr=5e-4, rank=4)  # same value twice: fine
    assert opt.param_groups[0]["lr"] == 5e-4
    with pytest.raises(ValueError, match="lr is given twice with different values: 0.0005 by "
                                         "args, 0.01 by keyword"):
        trainer_cls_and_kwargs(model, "galore", args=args, lr=1e-2)
    with pytest.raises(ValueError, match="rank is given twice"):
        trainer_cls_and_kwargs(model, "galore", args=_args(tmp_path, optim_args="rank=4"), rank=8)
    with pytest.raises(ValueError, match="method is given twice"):
        trainer_cls_and_kwargs(model, "galore", args=_args(tmp_path, optim_args="method=i3s"))
    with pytest.raises(ValueError, match="seed is given twice"):
        build_trainer_optimizer(model, "i3s", args=args, seed=5, rank=4)
    with pytest.raises(ValueError, match="no learning rate"):
        build_trainer_optimizer(model, "i3s")
    assert build_trainer_optimizer(model, "i3s", lr=1e-2, rank=4).param_groups[0]["lr"] == 1e-2


@pytest.mark.parametrize("optim_args,pattern", [
    (None, "no optimizer method"),
    ("method=i3s,rank=lots", "optim_args: argument --rank: invalid int value: 'lots'"),
    ("method=i3s,bogus=1", "expected key=value pairs with keys from method, lr"),
    ("method=i3s,rank", "got 'rank'"),
    ("method=nope", "unknown optimizer 'nope'"),
])
def test_subspace_trainer_bad_optim_args(tmp_path, optim_args, pattern):
    model = build_model("micro", VOCAB, seed=0)
    trainer = SubspaceTrainer(model=model, args=_args(tmp_path, optim_args=optim_args),
                              train_dataset=Tokens())
    with pytest.raises(ValueError, match=pattern):
        trainer.create_optimizer()
