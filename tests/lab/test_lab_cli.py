"""CLI smoke tests: `subspace pretrain`, `subspace compare` on a tiny budget, `subspace report`."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lab_helpers import lab_cache  # noqa: F401
from subspace_lab.cli import main


def _common(lab_cache) -> list[str]:
    return ["--model", "micro", "--max-docs", "40", "--vocab-size", "512", "--seq-len", "32",
            "--batch-size", "4", "--eval-batches", "2", "--cache-dir", str(lab_cache),
            "--no-progress"]


def test_pretrain_and_resume(tmp_path, lab_cache, capsys):
    out = tmp_path / "run"
    args = ["pretrain", *_common(lab_cache), "--steps", "6", "--eval-every", "3",
            "--optimizer", "galore", "--rank", "4", "--update-proj-gap", "2", "--lr", "0.01",
            "--out-dir", str(out)]
    assert main([*args, "--stop-at", "3"]) == 0
    assert main([*args, "--resume"]) == 0
    summary = json.loads(capsys.readouterr().out.split("\n}\n")[-2] + "\n}")
    assert summary["steps"] == 6 and summary["final_val_ppl"] > 1
    saved = json.loads((out / "config.json").read_text())
    assert saved["optim"]["method"] == "galore" and saved["optim"]["rank"] == 4
    assert (out / "checkpoints" / "step-000003" / "manifest.json").exists()
    # the run's table and plots, as compare writes them
    assert summary["report"] == str(out / "results.md") and "| galore |" in (out / "results.md").read_text()
    for png in ("val_loss.png", "overlap.png"):
        assert (out / png).stat().st_size > 1000 and str(out / png) in summary["plots"]


def test_compare_and_report(tmp_path, lab_cache, capsys):
    out = tmp_path / "cmp"
    rc = main(["compare", *_common(lab_cache), "--steps", "6", "--eval-every", "3",
               "--optimizers", "adamw,i3s", "--lrs", "adamw=2e-3,i3s=5e-3", "--seeds", "0,1",
               "--rank", "4", "--update-proj-gap", "2", "--svd-method", "gram",
               "--out-dir", str(out)])
    assert rc == 0
    # subspace-only options reach the subspace runs and are left out of AdamW's
    assert json.loads((out / "i3s-seed0" / "config.json").read_text())["optim"]["svd_method"] == "gram"
    assert json.loads((out / "adamw-seed1" / "config.json").read_text())["optim"]["svd_method"] is None
    printed = capsys.readouterr().out
    assert f"Report: {(out / 'results.md').resolve()}" in printed
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert sorted((r["optimizer"], r["seed"], r["lr"]) for r in rows) == [
        ("adamw", "0", "0.002"), ("adamw", "1", "0.002"), ("i3s", "0", "0.005"), ("i3s", "1", "0.005")]
    md = (out / "results.md").read_text()
    assert "| i3s | 0.005 | 2 |" in md and "±" in md and "subspace compare" in md
    for png in ("val_loss.png", "overlap.png"):
        assert (out / png).stat().st_size > 1000
    for f in ("results.csv", "results.md", "val_loss.png", "overlap.png"):
        (out / f).unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "results.md").read_text() == md and (out / "overlap.png").exists()


@pytest.mark.parametrize("flag,value,pattern", [
    ("--optimizer", "nope", "unknown optimizer 'nope'; allowed: adamw, galore, i3s"),
    ("--model", "huge", "unknown model 'huge'; allowed: micro, tiny"),
    ("--data", "missing.jsonl", "not found"),
    ("--seq-len", "300", "exceeds the model's max_position_embeddings 256"),
    ("--nonfinite", "ignore", "invalid choice"),
])
def test_bad_input_is_a_clear_error(tmp_path, lab_cache, capsys, flag, value, pattern):
    try:
        rc = main(["pretrain", *_common(lab_cache), "--steps", "1",
                   "--out-dir", str(tmp_path / "r"), flag, value])
    except SystemExit as e:  # argparse rejects bad choices itself
        rc = e.code
    assert rc == 2
    assert pattern in capsys.readouterr().err


def test_console_script_and_extension_hook():
    exe = Path(sys.executable).with_name("subspace")
    proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True)
    assert proc.returncode == 0
    for cmd in ("pretrain", "compare", "report"):
        assert cmd in proc.stdout
    from subspace_lab.commands import COMMANDS
    assert COMMANDS[:3] == ("pretrain", "compare", "report")


def test_lr_sweep_parsing_and_best_marking():
    from subspace_lab.compare import parse_lrs
    from subspace_lab.report import aggregate, markdown_table
    assert parse_lrs("adamw=3e-3,galore=5e-3:1e-2") == {"adamw": [3e-3], "galore": [5e-3, 1e-2]}
    for bad in ("adamw", "adamw=x", "adamw=-1"):
        with pytest.raises(ValueError, match="--lrs"):
            parse_lrs(bad)
    row = dict(optimizer="galore", seed=0, final_val_ppl=1.0, optimizer_state_mb=1.0,
               peak_memory_mb=1.0, peak_memory_kind="cpu_rss_sampled", tokens_per_s=1.0)
    rows = [{**row, "lr": 5e-3, "final_val_loss": 4.0}, {**row, "lr": 1e-2, "final_val_loss": 3.9},
            {**row, "lr": 1e-2, "seed": 1, "final_val_loss": 3.7}]
    agg = aggregate(rows)
    assert [a.get("best", False) for a in agg] == [False, True]
    assert agg[1]["final_val_loss"][0] == pytest.approx(3.8)
    assert "| galore | 0.01 (best) | 2 | 3.800 ± 0.141 |" in markdown_table(rows)


def test_compare_help_shows_compare_defaults(capsys):
    from subspace_lab.compare import default_compare_config
    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    text = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]  # not the usage
    d = default_compare_config()
    for flag, value in [("--steps INT", d.steps), ("--batch-size INT", d.batch_size),
                        ("--update-proj-gap INT", d.optim.update_proj_gap),
                        ("--eval-every INT", d.eval_every), ("--out-dir STR", d.out_dir),
                        ("--threads INT", d.threads)]:
        shown = re.search(re.escape(flag) + r" .*?\(default: ([^)]*)\)", text).group(1)
        assert shown == str(value), flag
    assert (d.steps, d.batch_size, d.optim.update_proj_gap, d.out_dir) == \
        (600, 8, 12, "runs/compare")


@pytest.mark.parametrize("command", ["pretrain", "compare"])
def test_rank_at_projected_dimension_warns_before_training(tmp_path, lab_cache, capsys,
                                                            monkeypatch, command):
    import subspace_lab.compare as C
    import subspace_lab.train as T

    def no_training(*a, **k):
        raise ValueError("stopped before any data was built")
    monkeypatch.setattr(T, "build_data", no_training)
    monkeypatch.setattr(C, "build_data", no_training)
    opt = ["--optimizer", "galore"] if command == "pretrain" else ["--optimizers", "adamw,galore,i3s"]
    argv = [command, *_common(lab_cache), "--rank", "32", *opt, "--out-dir", str(tmp_path / "w")]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: --rank 32 is >= the smaller dimension of 14 of the 14 "
                             "projected weights of model 'micro'")
    assert ("galore, i3s project nothing" if command == "compare" else "galore projects nothing") in err[0]
    assert "stopped before any data was built" in err[1]
    assert main([command, *_common(lab_cache), "--rank", "8", *opt,
                 "--out-dir", str(tmp_path / "w")]) == 2
    assert "warning" not in capsys.readouterr().err


def test_report_of_diverged_seeds_shows_inf():
    from subspace_lab.report import markdown_table
    row = dict(optimizer="galore", lr=1e3, optimizer_state_mb=1.0, peak_memory_mb=1.0,
               peak_memory_kind="cpu_rss_sampled", tokens_per_s=1.0)
    rows = [{**row, "seed": s, "final_val_loss": 1e8 + s, "final_val_ppl": float("inf")}
            for s in (0, 1)]
    assert "| galore | 1000 | 2 | 100000000.500 ± 0.707 | inf |" in markdown_table(rows)
