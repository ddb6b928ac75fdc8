"""The config dataclasses, their flags (transformers.HfArgumentParser) and config files."""
import dataclasses
import json

import pytest

from subspace_lab.args import LabArgumentParser, UsageError, train_config
from subspace_lab.config import DataConfig, OptimConfig, TrainConfig, leaves


def _parse(*argv, base=None) -> TrainConfig:
    return train_config(LabArgumentParser(TrainConfig, base=base, prog="t").parse_args(list(argv)))


def test_round_trip():
    cfg = TrainConfig()
    cfg.optim.method, cfg.optim.rank, cfg.data.seq_len, cfg.nonfinite = "i3s", 8, 64, "skip"
    cfg.optim.svd_method, cfg.optim.stagger_refresh = "gram", True
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()


def test_configs_saved_by_earlier_versions_load():
    old = TrainConfig().to_dict()
    old["model"] = {"name": "micro"}
    old["optim"]["name"] = old["optim"].pop("method")
    for key in ("svd_method", "selector", "transition", "adam_epsilon"):  # fields added since
        del old["optim"][key]
    cfg = TrainConfig.from_dict(old)
    assert cfg.model == "micro" and cfg.optim.method == "adamw" and cfg.optim.svd_method is None


def test_unknown_key_and_bad_values():
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="config.optim: unknown key 'nme'"):
        TrainConfig.from_dict({"optim": {"nme": "adamw"}})
    for mutate, pattern in [(lambda c: setattr(c, "nonfinite", "ignore"), "nonfinite"),
                            (lambda c: setattr(c, "batch_size", 0), "batch_size"),
                            (lambda c: setattr(c.optim, "lr", -1.0), "optim.lr"),
                            (lambda c: setattr(c, "warmup_fraction", 1.0), "warmup_fraction")]:
        cfg = TrainConfig()
        mutate(cfg)
        with pytest.raises(ValueError, match=pattern):
            cfg.validate()


def test_budget():
    cfg = TrainConfig()
    cfg.batch_size, cfg.grad_accum, cfg.data.seq_len, cfg.tokens = 4, 2, 32, 1000
    assert cfg.tokens_per_step(world_size=2) == 512
    assert cfg.total_steps(world_size=2) == 2
    cfg.steps = 7
    assert cfg.total_steps() == 7


def test_flags_map_onto_fields():
    cfg = _parse("--model", "small", "--optimizer", "galore", "--lr", "0.01", "--rank", "16",
                 "--seq-len", "64", "--no-progress", "--resume", "--nonfinite", "skip",
                 "--max-docs", "5", "--data", "corpus.txt")
    assert (cfg.model, cfg.optim.method, cfg.optim.lr, cfg.optim.rank) == ("small", "galore", 0.01, 16)
    assert (cfg.data.seq_len, cfg.progress, cfg.resume, cfg.nonfinite) == (64, False, True, "skip")
    assert cfg.data.max_docs == 5 and cfg.batch_size == TrainConfig().batch_size
    assert cfg.data.source == "corpus.txt"
    # Hugging Face spellings work too
    assert _parse("--learning_rate", "0.02", "--update_proj_gap", "7").optim.update_proj_gap == 7
    with pytest.raises(UsageError, match="invalid choice: 'ignore'"):
        _parse("--nonfinite", "ignore")
    with pytest.raises(UsageError, match="unrecognized arguments: --lrr"):
        _parse("--lrr", "1")


def test_every_optimizer_option_is_a_flag():
    """Each keyword of SubspaceOptimizer and of the components' `defaults` has a field (and so a
    flag), except those the lab sets itself."""
    import inspect

    from subspace_optim import SubspaceOptimizer
    from subspace_optim.optimizer import component_defaults
    keywords = set(inspect.signature(SubspaceOptimizer).parameters) | set(component_defaults())
    set_by_lab = {"params", "component_options", "seed", "nonfinite", "subspace", "betas", "eps"}
    fields = {f.name for f in dataclasses.fields(OptimConfig)}
    assert keywords - set_by_lab <= fields, keywords - set_by_lab - fields
    cfg = _parse("--optimizer", "subspace", "--selector", "importance", "--transition", "rotate",
                 "--inner", "lion", "--svd-method", "gram", "--stagger-refresh", "true",
                 "--side", "right", "--rho", "0.5", "--osd-variant", "code",
                 "--error-feedback", "false", "--adam-beta1", "0.8")
    assert (cfg.optim.selector, cfg.optim.transition, cfg.optim.inner, cfg.optim.svd_method) == \
        ("importance", "rotate", "lion", "gram")
    assert cfg.optim.stagger_refresh is True and cfg.optim.error_feedback is False
    assert (cfg.optim.side, cfg.optim.rho, cfg.optim.osd_variant, cfg.optim.adam_beta1) == \
        ("right", 0.5, "code", 0.8)


def test_leaf_names_are_unique():
    names = [f.name for c in (TrainConfig, DataConfig, OptimConfig) for f in dataclasses.fields(c)
             if f.name not in ("data", "optim")]  # the sections
    assert len(names) == len(set(names)) == len(leaves())


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_config_file_then_flags(tmp_path, suffix):
    settings = {"model": "micro", "optim": {"method": "i3s", "lr": "1e-3"}, "rank": 4,
                "seq_len": 64, "progress": False}
    if suffix == ".yaml":  # flat names, and `1e-3` (a string to YAML) read as the float it means
        text = "model: micro\nmethod: i3s\nlr: 1e-3\nrank: 4\nseq_len: 64\nprogress: false\n"
    else:  # sections, as a run's config.json
        text = json.dumps(settings)
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    cfg = _parse("--config", str(path), "--rank", "8")
    assert (cfg.model, cfg.optim.method, cfg.optim.lr) == ("micro", "i3s", 1e-3)
    assert cfg.optim.rank == 8 and cfg.data.seq_len == 64 and cfg.progress is False


def test_a_run_directory_config_json_reproduces_the_run(tmp_path):
    cfg = TrainConfig()
    cfg.model, cfg.optim.method, cfg.optim.svd_method, cfg.steps = "micro", "galore", "gram", 9
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert _parse("--config", str(tmp_path / "config.json")) == cfg


def test_bad_config_files(tmp_path):
    cases = {"a.yaml": ("rank: many\n", "rank: cannot read 'many' as int"),
             "b.yaml": ("optim: {nme: x}\n", "unknown key 'nme'"),
             "c.json": ("{not json", "not valid json"),
             "d.yaml": ("- 1\n- 2\n", "expected a mapping"),
             "e.yaml": ("nonfinite: ignore\n", "nonfinite must be one of error, skip")}
    for name, (text, pattern) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=pattern):
            _parse("--config", str(tmp_path / name))
    with pytest.raises(ValueError, match="no such file"):
        _parse("--config", str(tmp_path / "missing.yaml"))


def test_base_config_gives_the_defaults_and_tokens_replace_its_steps():
    from subspace_lab.compare import default_compare_config
    base = default_compare_config()
    assert _parse(base=base) == base.validate()
    cfg = _parse("--tokens", "4096", base=base)
    assert cfg.total_steps() == 4096 // (8 * 128)
