"""Updates inside backward with the Hugging Face Trainer (single process): the same weights as the
ordinary Trainer run, with and without gradient accumulation (as docs/memory.md describes)."""
import pytest
import torch

pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")

from subspace_lab.hf_trainer import build_trainer_optimizer  # noqa: E402
from subspace_lab.models import build_model  # noqa: E402

VOCAB = 128


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48, seq=16):
        self.x = torch.randint(0, VOCAB, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i]}


def _run(out, in_backward: bool, accumulate: int):
    from transformers import Trainer, TrainingArguments

    model = build_model("micro", VOCAB, seed=0)
    args = TrainingArguments(
        output_dir=str(out), max_steps=4, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True, dataloader_num_workers=0, save_strategy="no",
        gradient_accumulation_steps=accumulate, max_grad_norm=0.0)  # clipping: see docs/memory.md
    opt = build_trainer_optimizer(model, "galore", lr=1e-2, rank=4, update_proj_gap=2)
    handle = opt.step_in_backward(accumulate=accumulate) if in_backward else None
    Trainer(model=model, args=args, train_dataset=Tokens(), optimizers=(opt, None)).train()
    if handle is not None:
        assert all(p.grad is None for p in model.parameters())
        handle.remove()
    return model


@pytest.mark.parametrize("accumulate", [1, 2])
def test_trainer_with_updates_in_backward_matches_ordinary(tmp_path, accumulate):
    plain = _run(tmp_path / "plain", False, accumulate)
    inside = _run(tmp_path / "inside", True, accumulate)
    for a, b in zip(plain.parameters(), inside.parameters()):
        if accumulate == 1:
            assert torch.equal(a, b)
        else:
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
