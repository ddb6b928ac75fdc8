"""`subspace finetune`: tasks, verbalizer scoring, eval-mode closures (Z8 harness side) and a smoke
run of each optimizer on a tiny random LLaMA and a tiny local jsonl task."""

from __future__ import annotations

import json
import re

import pytest
import torch

from subspace_lab import finetune as ft
from subspace_lab.pretrained import VerbalizerScorer, label_token_ids, load_model
from subspace_lab.tasks import hf_task, jsonl_task, kjv_testament_task, load_task

POS = ["a great film", "wonderful and moving", "i loved it", "superb acting", "a joy to watch"]
NEG = ["a dull mess", "boring and long", "i hated it", "awful acting", "a waste of time"]


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture()
def jsonl_file(tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"text": t, "label": "great"} for t in POS] + [{"text": t, "label": "bad"} for t in NEG]
    path.write_text("\n".join(json.dumps(r) for r in rows * 3) + "\n")
    return path


def test_jsonl_task_maps_string_labels_and_splits(jsonl_file):
    task = jsonl_task(jsonl_file, template="{text} It was", n_train=20, n_eval=8)
    assert task.label_words == [" bad", " great"]
    assert len(task.train) == 20 and len(task.eval) == 8
    assert sorted({y for _, y in task.train}) == [0, 1]
    assert task.prompt("x") == "x It was"


def test_jsonl_task_errors(tmp_path):
    p = tmp_path / "ints.jsonl"
    p.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    with pytest.raises(ValueError, match="label-words"):
        jsonl_task(p)
    task = jsonl_task(p, label_words=[" no", " yes"], n_train=1, n_eval=1)
    assert len(task.train) == 1
    with pytest.raises(ValueError, match="out of range"):
        jsonl_task(p, label_words=[" no"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "a", "label": 0}\n')
    with pytest.raises(ValueError, match="'text' and 'label'"):
        jsonl_task(bad, label_words=[" no", " yes"])
    with pytest.raises(FileNotFoundError):
        jsonl_task(tmp_path / "missing.jsonl")


def test_hf_loader_on_local_files(tmp_path):
    for split, texts in (("train", POS + NEG), ("validation", POS[:2] + NEG[:2])):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(
            json.dumps({"sentence": t, "label": int(t in POS)}) for t in texts))
    files = {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "validation")}
    task = hf_task("local", label_words=[" terrible", " great"], data_files=files, n_train=6, n_eval=4)
    assert len(task.train) == 6 and len(task.eval) == 4
    assert {t for t, _ in task.eval} <= set(POS[:2] + NEG[:2])


def test_kjv_testament_task_is_balanced_and_clean():
    task = kjv_testament_task(n_train=40, n_eval=20, seed=1)
    assert task.label_words == [" Old", " New"]
    assert sum(y for _, y in task.train) == 20 and sum(y for _, y in task.eval) == 10
    assert not any(re.search(r"\d+:\d+", t) for t, _ in task.train + task.eval)
    assert not {t for t, _ in task.train} & {t for t, _ in task.eval}
    assert load_task("kjv-testament", n_train=4, n_eval=2).name == "kjv-testament"


def test_label_words_must_have_distinct_first_tokens(jsonl_file):
    task = jsonl_task(jsonl_file)
    _, tok = load_model("tiny-random", [task.prompt(t) for t, _ in task.train] + ["great", "bad"])
    assert len(set(label_token_ids(tok, [" great", " bad"]))) == 2
    with pytest.raises(ValueError, match="first token"):
        label_token_ids(tok, [" great", " great"])


def test_zo_closure_runs_in_eval_mode_without_graph(jsonl_file):
    # The tiny model has attention dropout 0.1: in train mode two calls would differ.
    task = jsonl_task(jsonl_file)
    model, tok = load_model("tiny-random", [task.prompt(t) for t, _ in task.train] + task.label_words)
    model.train()
    scorer = VerbalizerScorer(model, tok, task.label_words)
    closure = ft.make_closure(scorer, task, [0, 1, 2, 3])
    a, b = closure(), closure()
    assert not model.training
    assert torch.equal(a, b) and not a.requires_grad


def test_batch_indices_keyed_and_global_rng_free():
    state = torch.get_rng_state()
    a = ft.batch_indices(30, 8, seed=3, step=5)
    assert a == ft.batch_indices(30, 8, seed=3, step=5) != ft.batch_indices(30, 8, seed=3, step=6)
    assert len(set(a)) == 8 and torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("optimizer", ["mezo", "subzero", "adamw"])
def test_finetune_smoke_tiny_model(jsonl_file, tmp_path, optimizer):
    cfg = ft.FinetuneConfig(model="tiny-random", task=str(jsonl_file), optimizer=optimizer, steps=3,
                            batch_size=4, lr=1e-3, n_train=20, n_eval=8, eval_batch_size=4,
                            rank=2, update_proj_gap=2, out_dir=str(tmp_path / optimizer),
                            template="{text} It was", progress=False)
    result = ft.finetune(cfg)
    saved = json.loads((tmp_path / optimizer / "results.json").read_text())
    assert (tmp_path / optimizer / "results.md").is_file() and (tmp_path / optimizer / "loss.png").is_file()
    assert len(saved["train_losses"]) == 3 and saved["skipped_steps"] == 0
    zo = optimizer != "adamw"
    assert saved["train_forward_passes"] == (6 if zo else 3)
    assert saved["train_backward_passes"] == (0 if zo else 3)
    assert 0.0 <= saved["after"]["accuracy"] <= 1.0 and saved["peak_memory_mb"] > 0
    assert result["before"]["n"] == 8


def test_finetune_command_line(jsonl_file, tmp_path, capsys):
    from subspace_lab.cli import main

    assert main(["finetune", "--model", "tiny-random", "--task", str(jsonl_file),
                 "--optimizer", "subzero", "--steps", "2", "--batch-size", "4",
                 "--n-train", "10", "--n-eval", "4", "--label-words", "bad,great",
                 "--trainable", "layers\\.1\\.", "--out-dir", str(tmp_path / "cli"),
                 "--no-progress", "--lr", "1e-3"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["train_forward_passes"] == 4
    saved = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert saved["config"]["label_words"] == [" bad", " great"]
    model, _ = load_model("tiny-random", ["bad great"])
    layer1 = sum(p.numel() for n, p in model.named_parameters() if "layers.1." in n)
    assert saved["trainable_params"] == layer1


def test_finetune_rejects_bad_config(jsonl_file):
    with pytest.raises(ValueError, match="optimizer"):
        ft.finetune(ft.FinetuneConfig(model="tiny-random", task=str(jsonl_file), optimizer="sgd"))
    with pytest.raises(ValueError, match="matches no parameter"):
        ft.finetune(ft.FinetuneConfig(model="tiny-random", task=str(jsonl_file), trainable="nope",
                                      steps=1, n_train=4, n_eval=2, progress=False))


def test_registered_in_the_subspace_command(jsonl_file, tmp_path, capsys):
    from subspace_lab.cli import main

    code = main(["finetune", "--model", "tiny-random", "--task", str(jsonl_file), "--optimizer", "mezo",
                 "--steps", "1", "--batch-size", "2", "--n-train", "4", "--n-eval", "2",
                 "--out-dir", str(tmp_path / "main"), "--no-progress"])
    assert code == 0 and (tmp_path / "main" / "results.json").is_file()
    assert main(["finetune", "--model", "tiny-random", "--task", str(jsonl_file), "--steps", "-1",
                 "--no-progress"]) == 2  # bad input: the CLI's clear-error exit code
