"""What `--resume` refuses (no checkpoint, changed data, changed settings) and what it allows
(a different --steps: the schedule is recomputed over the new total)."""
import pytest
import torch

from lab_helpers import lab_cache, make_cfg, read_jsonl, write_text_corpus  # noqa: F401
from subspace_lab import checkpoint as ckpt
from subspace_lab.config import TrainConfig
from subspace_lab.train import lr_schedule, train


def test_resume_without_a_valid_checkpoint_refuses_and_keeps_metrics(tmp_path, lab_cache):
    train(make_cfg(tmp_path / "r", lab_cache, steps=6, stop_at=3))
    (tmp_path / "r" / "checkpoints" / "step-000003" / "manifest.json").unlink()
    before = (tmp_path / "r" / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"no valid checkpoint.*step-000003 \(no manifest\.json\)"):
        train(make_cfg(tmp_path / "r", lab_cache, steps=6, resume=True))
    assert (tmp_path / "r" / "metrics.jsonl").read_bytes() == before
    with pytest.raises(ValueError, match=r"no valid checkpoint.*empty-run/checkpoints does not exist"):
        train(make_cfg(tmp_path / "empty-run", lab_cache, steps=6, resume=True))


def test_resume_refuses_an_edited_corpus(tmp_path, lab_cache):
    corpus = write_text_corpus(tmp_path / "c.txt", 20)
    kw = dict(data__source=str(corpus), data__max_docs=None, steps=6)
    train(make_cfg(tmp_path / "r", lab_cache, stop_at=3, **kw))
    corpus.write_text(corpus.read_text().replace("God", "Gods"))  # same size of vocabulary
    with pytest.raises(ValueError, match=r"the data differs.*tokenizer \(saved '[0-9a-f]+', now"):
        train(make_cfg(tmp_path / "r", lab_cache, resume=True, **kw))


def test_resume_refuses_a_different_validation_set(tmp_path, lab_cache):
    train(make_cfg(tmp_path / "r", lab_cache, steps=6, stop_at=3))
    with pytest.raises(ValueError, match=r"config differs in eval_batches \(saved 2, now 3\)"):
        train(make_cfg(tmp_path / "r", lab_cache, steps=6, eval_batches=3, resume=True))
    with pytest.raises(ValueError, match=r"config differs in batch_size \(saved 4, now 2\)"):
        train(make_cfg(tmp_path / "r", lab_cache, steps=6, batch_size=2, resume=True))


def _factor(total: int, steps: int, warmup_fraction: float):
    cfg = TrainConfig()
    cfg.warmup_fraction, cfg.steps = warmup_fraction, steps
    return lr_schedule(torch.optim.SGD([torch.zeros(1)], lr=1.0), total, cfg).lr_lambdas[0]


def test_resume_extends_a_finished_run(tmp_path, lab_cache):
    kw = dict(optim__method="galore", checkpoint_every=3, eval_every=3, warmup_fraction=0.2)
    first = train(make_cfg(tmp_path / "r", lab_cache, steps=6, **kw))
    more = train(make_cfg(tmp_path / "r", lab_cache, steps=10, resume=True, **kw))
    assert len(more.losses) == 4 and more.steps == 10
    records = read_jsonl(tmp_path / "r" / "metrics.jsonl")
    lrs = {r["step"]: r["lr"] for r in records if r["event"] == "train"}
    # before the resume point: the 6-step schedule; after it: the 10-step one (warmup 2)
    assert lrs[6] == pytest.approx(1e-2 * _factor(6, 6, 0.2)(6))
    for s in range(7, 11):
        assert lrs[s] == pytest.approx(1e-2 * _factor(10, 10, 0.2)(s)), s
    assert [r["step"] for r in records if r["event"] == "eval"] == [3, 6, 9, 10]
    assert first.final_val_loss != more.final_val_loss
    assert ckpt.find_latest_valid(tmp_path / "r" / "checkpoints").name == "step-000010"
    with pytest.raises(ValueError, match=r"--steps 8 is below the checkpoint's step 10"):
        train(make_cfg(tmp_path / "r", lab_cache, steps=8, resume=True, **kw))
