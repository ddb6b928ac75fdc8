import argparse

import pytest


from subspace_lab.config import TrainConfig, add_config_args, config_from_args


def test_round_trip():
    cfg = TrainConfig()
    cfg.optim.name, cfg.optim.rank, cfg.data.seq_len, cfg.nonfinite = "i3s", 8, 64, "skip"
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.to_dict() == cfg.to_dict()


def test_unknown_key_and_bad_values():
    with pytest.raises(ValueError, match="unknown keys.*bogus"):
        TrainConfig.from_dict({"bogus": 1})
    with pytest.raises(ValueError, match="unknown keys"):
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


def test_flags_map_onto_fields(tmp_path):
    p = argparse.ArgumentParser()
    add_config_args(p)
    args = p.parse_args(["--model", "small", "--optimizer", "galore", "--lr", "0.01",
                         "--rank", "16", "--seq-len", "64", "--no-progress", "--resume",
                         "--nonfinite", "skip", "--max-docs", "5"])
    cfg = config_from_args(args)
    assert (cfg.model.name, cfg.optim.name, cfg.optim.lr, cfg.optim.rank) == ("small", "galore", 0.01, 16)
    assert (cfg.data.seq_len, cfg.progress, cfg.resume, cfg.nonfinite) == (64, False, True, "skip")
    assert cfg.data.max_docs == 5 and cfg.batch_size == TrainConfig().batch_size
    with pytest.raises(SystemExit):
        p.parse_args(["--nonfinite", "ignore"])
