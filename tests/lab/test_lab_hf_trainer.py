"""Our optimizers inside the Hugging Face Trainer: train, checkpoint, resume_from_checkpoint, and
continue identically (the Trainer loads optimizer.pt with weights_only=True)."""
import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from subspace_lab.hf_trainer import build_trainer_optimizer, trainer_cls_and_kwargs  # noqa: E402
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


def _trainer(out, max_steps, how):
    from transformers import Trainer, TrainingArguments

    model = build_model("micro", VOCAB, seed=0)
    args = TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, save_steps=3,
        logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0, warmup_steps=1,
        lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
        disable_tqdm=True, dataloader_num_workers=0, save_only_model=False)
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


@pytest.mark.parametrize("how", ["instance", "cls_and_kwargs"])
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
