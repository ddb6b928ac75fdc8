"""`subspace finetune` as a lab command: flags and config files from FinetuneConfig, and the
first-order path through the same closure as the zeroth-order one."""
import json

import pytest
import torch

from subspace_lab import finetune as ft
from subspace_lab.cli import main
from subspace_lab.commands.finetune import label_words


@pytest.fixture()
def task_file(tmp_path):
    rows = [{"text": f"review {i} {'great' if i % 2 else 'bad'}", "label": i % 2} for i in range(24)]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def _cfg(task_file, tmp_path, **kw) -> ft.FinetuneConfig:
    base = dict(model="tiny-random", task=str(task_file), optimizer="adamw", steps=3, batch_size=4,
                lr=1e-3, n_train=16, n_eval=4, eval_batch_size=4, label_words=[" bad", " great"],
                out_dir=str(tmp_path / "out"), progress=False)
    return ft.FinetuneConfig(**{**base, **kw})


def test_label_words_from_the_command_line():
    assert label_words(["no,yes"]) == label_words(["no", "yes"]) == [" no", " yes"]
    assert label_words(None) is None


def test_adamw_skips_a_nonfinite_loss_without_touching_the_weights(task_file, tmp_path,
                                                                    monkeypatch):
    from subspace_lab.pretrained import VerbalizerScorer
    real, calls, weights = VerbalizerScorer.loss, {"n": 0}, {}

    def nan_at_second_step(self, prompts, labels):
        calls["n"] += 1
        loss = real(self, prompts, labels)
        if calls["n"] == 2:
            weights["before"] = {k: v.clone() for k, v in self.model.state_dict().items()}
            return loss * float("nan")
        if calls["n"] == 3:
            weights["after"] = {k: v.clone() for k, v in self.model.state_dict().items()}
        return loss
    monkeypatch.setattr(VerbalizerScorer, "loss", nan_at_second_step)
    result = ft.finetune(_cfg(task_file, tmp_path, nonfinite="skip"))
    assert result["skipped_steps"] == 1
    assert all(torch.equal(weights["before"][k], weights["after"][k]) for k in weights["before"])
    calls["n"] = 0
    with pytest.raises(RuntimeError, match="non-finite loss nan at step 1; no update"):
        ft.finetune(_cfg(task_file, tmp_path, nonfinite="error", out_dir=str(tmp_path / "e")))


def test_finetune_reads_a_config_file(task_file, tmp_path, capsys):
    settings = tmp_path / "ft.yaml"
    settings.write_text(f"model: tiny-random\ntask: {task_file}\noptimizer: mezo\nsteps: 2\n"
                        f"batch_size: 4\nn_train: 8\nn_eval: 4\nlabel_words: [bad, great]\n"
                        f"lr: 1e-4\nprogress: false\nout_dir: {tmp_path / 'cfg'}\n")
    assert main(["finetune", "--config", str(settings), "--steps", "1"]) == 0
    saved = json.loads((tmp_path / "cfg" / "results.json").read_text())
    assert saved["config"]["steps"] == 1 and saved["config"]["lr"] == 1e-4
    assert saved["config"]["label_words"] == [" bad", " great"]
    capsys.readouterr()
    assert main(["finetune", "--optimizer", "sgd"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "invalid choice: 'sgd'" in err[0]


@pytest.mark.parametrize("optimizer", ["mezo", "subzero"])
def test_zeroth_order_skips_come_from_the_optimizers_counter(task_file, tmp_path, monkeypatch,
                                                             optimizer):
    from subspace_lab.pretrained import VerbalizerScorer
    real, calls = VerbalizerScorer.loss, {"n": 0}

    def nan_in_second_step(self, prompts, labels):  # two evaluations a step: call 3 is step 1's
        calls["n"] += 1
        return real(self, prompts, labels) * (float("nan") if calls["n"] == 3 else 1.0)
    monkeypatch.setattr(VerbalizerScorer, "loss", nan_in_second_step)
    built = []
    monkeypatch.setattr(ft, "build_optimizer",
                        lambda cfg, model, real=ft.build_optimizer: built.append(real(cfg, model))
                        or built[-1])
    result = ft.finetune(_cfg(task_file, tmp_path, optimizer=optimizer, nonfinite="skip"))
    assert result["skipped_steps"] == built[0].skipped_steps == 1
    assert built[0].param_groups[0]["step"] == 2  # 3 steps, one skipped


def test_zeroth_order_options_reach_the_optimizer(task_file, tmp_path):
    import inspect

    from subspace_lab.args import LabArgumentParser
    from subspace_optim.zeroth_order import SubZero
    model = torch.nn.Sequential(torch.nn.Linear(4, 40))
    defaults = ft.FinetuneConfig()
    for name in ("rank", "update_proj_gap", "reshape_min_dim"):  # one source: the library
        assert getattr(defaults, name) == inspect.signature(SubZero).parameters[name].default
    assert defaults.exact_restore is False
    parser = LabArgumentParser(ft.FinetuneConfig, prog="t")
    cfg = parser.parse_into(ft.FinetuneConfig, ["--optimizer", "subzero", "--exact-restore", "true",
                                                 "--reshape-min-dim", "0", "--rank", "3"])
    opt = ft.build_optimizer(cfg, model)
    assert opt.exact_restore is True
    assert (opt.param_groups[0]["reshape_min_dim"], opt.param_groups[0]["rank"]) == (0, 3)
    cfg = parser.parse_into(ft.FinetuneConfig, ["--optimizer", "mezo", "--exact-restore", "true"])
    assert ft.build_optimizer(cfg, model).exact_restore is True
