"""Shared fixtures for the lab tests: a micro LLaMA on the first KJV chapters, fast on CPU."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from subspace_lab.config import TrainConfig


def make_cfg(out_dir, cache_dir, **over) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = "micro"
    cfg.data.source = "kjv"
    cfg.data.max_docs = 40
    cfg.data.vocab_size = 512
    cfg.data.seq_len = 32
    cfg.data.cache_dir = str(cache_dir)
    cfg.batch_size = 4
    cfg.steps = 10
    cfg.eval_every = 5
    cfg.eval_batches = 2
    cfg.log_every = 1
    cfg.progress = False
    cfg.out_dir = str(out_dir)
    cfg.optim.rank = 4
    cfg.optim.update_proj_gap = 5
    cfg.optim.lr = 1e-2
    for k, v in over.items():
        obj = cfg
        *parents, leaf = k.split("__")
        for p in parents:
            obj = getattr(obj, p)
        if not hasattr(obj, leaf):  # a typo (or a renamed field) must not set a stray attribute
            raise AttributeError(f"make_cfg: {type(obj).__name__} has no field {leaf!r}")
        setattr(obj, leaf, v)
    return cfg


def read_jsonl(path) -> list[dict]:
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def params_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def write_text_corpus(path: Path, n_docs: int = 30) -> Path:
    """Paragraph documents from the KJV (separated by blank lines), as a local .txt file."""
    from subspace_lab.corpus import kjv_documents
    path.write_text("\n\n".join(kjv_documents()[:n_docs]) + "\n")
    return path


def write_jsonl_corpus(path: Path, n_docs: int = 30, field: str = "text") -> Path:
    from subspace_lab.corpus import kjv_documents
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n"
                            for i, d in enumerate(kjv_documents()[:n_docs])))
    return path


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def lab_cache(tmp_path_factory):
    """One tokenizer cache for the whole lab test session (BPE trained once per corpus).
    Test modules import this fixture: `from lab_helpers import lab_cache`."""
    return tmp_path_factory.mktemp("subspace-cache")
