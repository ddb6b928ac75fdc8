"""``docs/architecture.md`` lists every optimizer state key; this keeps the list true both ways.

Every preset and every option that creates state keys of its own is built on a tiny model (two
projected weights, one left- and one right-projected, plus a dense matrix and a bias; the left
weight's moments and the dense matrix are large enough for 8- and 16-bit storage, the others are
not), in fp32 and bf16, and stepped three
times with ``update_proj_gap=2`` (so a second refresh happens and ``overlap`` appears). Each state
key seen must have a row in the doc's per-parameter table, and each row's key must be seen in some
combination: a key added to the code without a row, or a row left behind by a removed key, fails.
The same holds for the param-group keys the optimizer adds at run time (the optimizer-level table).

Run as a script (``python tests/test_architecture_doc.py``) it prints, per key, the dtypes and
shapes it takes, the dtype it has after ``load_state_dict`` into a fresh bf16 optimizer, and the
combinations that create it: the facts the doc's table was written from.
"""

from __future__ import annotations

import re
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from subspace_optim import GaLoreAdamW, I3SAdamW, LDAdamW, OnlineSubspaceAdamW, SubspaceOptimizer

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"
STATE_HEADING = "## Per-parameter optimizer state"
GROUP_HEADING = "## Optimizer-level state"

RANK = 24
# name -> (m, n): wl is projected on the left (k, l) = (48, 192), its moments (24, 192) = 4,608
# elements, enough to be compressed; wr on the right, (k, l) = (40, 160); dense_mat (5,120 elements)
# is compressed by state_bits too, bias is too small to be
PROJECTED = {"wl": (48, 192), "wr": (160, 40)}
DENSE = {"dense_mat": (64, 80), "bias": (56,)}

# Each combination that creates keys of its own (or the same keys with another dtype or shape).
COMBOS = {
    "galore": (GaLoreAdamW, {}),
    "galore_rotate": (GaLoreAdamW, {"transition": "rotate"}),
    "galore_reset": (GaLoreAdamW, {"transition": "reset"}),
    "i3s": (I3SAdamW, {}),
    "osd": (OnlineSubspaceAdamW, {}),
    "osd_sgd": (OnlineSubspaceAdamW, {"osd_p_optimizer": "sgd"}),
    "osd_code": (OnlineSubspaceAdamW, {"osd_variant": "code"}),
    "ldadam": (LDAdamW, {}),
    "random": (SubspaceOptimizer, {"selector": "random"}),
    "coordinate": (SubspaceOptimizer, {"selector": "coordinate"}),
    "lion": (SubspaceOptimizer, {"inner": "lion"}),
    "sgd": (SubspaceOptimizer, {"inner": "sgd"}),
    "adamw_hf": (SubspaceOptimizer, {"inner": "adamw_hf"}),
    "error_feedback": (SubspaceOptimizer, {"error_feedback": True}),
    "two_sided": (SubspaceOptimizer, {"side": "full"}),
    "stagger": (SubspaceOptimizer, {"stagger_refresh": True}),
    "state_bits8": (SubspaceOptimizer, {"state_bits": 8}),
    "state_bits16": (SubspaceOptimizer, {"state_bits": 16}),
    "state_bits8_sgd": (SubspaceOptimizer, {"state_bits": 8, "inner": "sgd"}),
    "state_bits16_sgd": (SubspaceOptimizer, {"state_bits": 16, "inner": "sgd"}),
    "state_bits8_lion": (SubspaceOptimizer, {"state_bits": 8, "inner": "lion"}),
    "projector_bits16": (SubspaceOptimizer, {"projector_bits": 16}),
    "projector_bits8": (SubspaceOptimizer, {"projector_bits": 8}),
}
DTYPES = (torch.float32, torch.bfloat16)
STEPS = 3
# a param-group key that is a counter, not a hyperparameter, although the constructor sets it
GROUP_COUNTERS = {"skipped_steps"}
# param-group keys that say which parameters a group holds and whether it is projected
GROUP_ROUTING = {"params", "param_names", "subspace"}


def _build(cls, options: dict, dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    params = {name: torch.nn.Parameter(torch.randn(*shape, generator=gen).to(dtype))
              for name, shape in {**PROJECTED, **DENSE}.items()}
    groups = [
        {"params": [(name, params[name]) for name in PROJECTED], "subspace": True, "rank": RANK,
         "update_proj_gap": 2},
        {"params": [(name, params[name]) for name in DENSE], "subspace": False},
    ]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(groups, lr=1e-3, **options), params


def _run(cls, options: dict, dtype: torch.dtype):
    opt, params = _build(cls, options, dtype)
    gen = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    return opt, params


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{str(value.dtype).removeprefix('torch.')} {tuple(value.shape)}"
    return type(value).__name__


def observe() -> dict:
    """Every combination in both dtypes: the state keys, the param-group keys, and (bf16) each
    state value before saving and after loading into a fresh optimizer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest on a shared machine
    try:
        keys: dict[str, set] = defaultdict(set)  # state key -> {(combo, dtype, param, description)}
        group_keys: set[str] = set()
        hyperparameters: set[str] = set()
        resumed = []  # (combo, param, key, saved value, loaded value)
        for name, (cls, options) in COMBOS.items():
            for dtype in DTYPES:
                opt, params = _run(cls, options, dtype)
                hyperparameters |= set(opt.defaults)
                saved = opt.state_dict()
                assert set(saved) == {"state", "param_groups"}, sorted(saved)
                for group in saved["param_groups"]:
                    group_keys |= set(group)
                for pname, p in params.items():
                    for key, value in opt.state[p].items():
                        keys[key].add((name, str(dtype).removeprefix("torch."), pname, _describe(value)))
                if dtype is torch.bfloat16:
                    fresh, fresh_params = _build(cls, options, dtype)
                    fresh.load_state_dict(saved)
                    for pname, p in params.items():
                        for key, value in opt.state[p].items():
                            resumed.append((name, pname, key, value, fresh.state[fresh_params[pname]][key]))
        runtime_group_keys = (group_keys - hyperparameters - GROUP_ROUTING) | GROUP_COUNTERS
        return {"keys": dict(keys), "group_keys": group_keys, "runtime_group_keys": runtime_group_keys,
                "resumed": resumed}
    finally:
        torch.set_num_threads(threads)


def documented_keys(heading: str) -> set[str]:
    """The keys in the first column (written as `key`) of the table rows under ``heading``."""
    text = DOC.read_text(encoding="utf-8")
    assert heading in text, f"{DOC} has no section {heading!r}"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    keys = set()
    for line in section.splitlines():
        if not line.lstrip().startswith("|"):
            continue
        first = line.strip().strip("|").split("|")[0].strip()
        match = re.fullmatch(r"`([^`]+)`", first)
        if match:
            keys.add(match.group(1))
    return keys


@pytest.fixture(scope="module")
def observed():
    return observe()


def test_every_state_key_has_a_row(observed):
    missing = sorted(set(observed["keys"]) - documented_keys(STATE_HEADING))
    assert not missing, f"state keys with no row in {DOC.name}'s per-parameter table: {missing}"


def test_every_row_is_a_state_key(observed):
    stale = sorted(documented_keys(STATE_HEADING) - set(observed["keys"]))
    assert not stale, f"rows of {DOC.name}'s per-parameter table that no combination creates: {stale}"


def test_optimizer_level_table_matches(observed):
    documented = documented_keys(GROUP_HEADING)
    assert documented == observed["runtime_group_keys"], (
        f"{DOC.name}'s optimizer-level table lists {sorted(documented)}; the run-time param-group keys "
        f"are {sorted(observed['runtime_group_keys'])}")


def test_resume_keeps_every_dtype(observed):
    """The doc's claim for a bf16 resume: every state tensor comes back with its saved dtype and shape
    (torch alone would cast fp32 projectors, buffers, codes and scales to bf16), plain values as saved."""
    assert observed["resumed"]
    for combo, pname, key, saved, loaded in observed["resumed"]:
        where = f"{combo}/{pname}/{key}"
        if isinstance(saved, torch.Tensor):
            assert isinstance(loaded, torch.Tensor), where
            assert (loaded.dtype, loaded.shape) == (saved.dtype, saved.shape), where
        else:
            assert type(loaded) is type(saved) and loaded == saved, where


def _report() -> None:
    facts = observe()
    after = defaultdict(set)
    for _, pname, key, saved, loaded in facts["resumed"]:
        after[(key, pname)].add(f"{_describe(saved)} -> {_describe(loaded).split()[0]}")
    for key in sorted(facts["keys"]):
        print(f"== {key}")
        rows = defaultdict(list)
        for combo, dtype, pname, description in facts["keys"][key]:
            rows[(dtype, pname, description)].append(combo)
        for (dtype, pname, description), combos in sorted(rows.items()):
            print(f"   {dtype:9} {pname:9} {description:26} {', '.join(sorted(combos))}")
        for (k, pname), changes in sorted(after.items()):
            if k == key:
                print(f"   bf16 load  {pname:9} {'; '.join(sorted(changes))}")
    print("run-time param-group keys:", sorted(facts["runtime_group_keys"]))
    print("documented, per parameter:", sorted(documented_keys(STATE_HEADING)) if DOC.exists() else "no doc")


if __name__ == "__main__":
    _report()
