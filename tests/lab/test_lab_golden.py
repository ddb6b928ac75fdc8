"""H6 golden losses (docs/testing.md): for each registered optimizer, a micro LLaMA trained 20 steps
on CPU gives the losses in tests/golden/<name>.txt (one repr'd float per line).

The files were written on one machine and are compared on others, whose CPUs run other kernels
(vectorisation width, BLAS blocking): each loss must match to a relative tolerance, not bitwise.
GOLDEN_RTOL comes from measurement (docs/testing.md, "Portability"): over the 20 steps the losses
differ between ATEN_CPU_CAPABILITY=default, avx2 and avx512 by at most 3.6e-7 relative; a 1% change
of the learning rate moves them by 8e-4 or more, dropping GaLore's `scale` by 2e-2.
Regenerate only on purpose, after an intended numerical change:

    SUBSPACE_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/lab/test_lab_golden.py
"""
import os
from pathlib import Path

import pytest
import torch

from lab_helpers import lab_cache, make_cfg  # noqa: F401
from subspace_lab.optimizers import METHODS
from subspace_lab.train import train

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
REGEN = os.environ.get("SUBSPACE_REGEN_GOLDEN") == "1"
GOLDEN_RTOL = 1e-5  # about 28x the spread measured across CPU capabilities


def golden_losses(name: str) -> list[float]:
    path = GOLDEN / f"{name}.txt"
    if not path.exists():
        pytest.fail(f"no golden file {path} for optimizer {name!r}; create it with "
                    f"SUBSPACE_REGEN_GOLDEN=1 (see this module's docstring)")
    return [float(line) for line in path.read_text().split()]


def assert_matches_golden(losses: list[float], expected: list[float]) -> None:
    assert len(losses) == len(expected)
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.tensor(expected, dtype=torch.float64), rtol=GOLDEN_RTOL, atol=0)


def run_losses(tmp_path, cache, name: str, **over) -> list[float]:
    cfg = make_cfg(tmp_path / name, cache, optim__method=name, steps=20, eval_every=0, device="cpu", **over)
    return train(cfg).losses


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"subspace"}))  # subspace: below
def test_golden_losses(tmp_path, lab_cache, name):
    if torch.cuda.is_available():
        pytest.skip("golden losses are recorded on CPU")
    losses = run_losses(tmp_path, lab_cache, name)
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        (GOLDEN / f"{name}.txt").write_text("".join(f"{x!r}\n" for x in losses))
    assert_matches_golden(losses, golden_losses(name))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("change", [dict(optim__lr=1.01e-2), dict(optim__scale=1.0)], ids=["lr+1%", "no-scale"])
def test_golden_tolerance_still_catches_small_changes(tmp_path, lab_cache, change):
    """The tolerance is loose enough for other kernels and tight enough for plausible bugs: a 1%
    larger learning rate, or GaLore's `scale` (0.25 in the lab) not applied."""
    if torch.cuda.is_available():
        pytest.skip("golden losses are recorded on CPU")
    losses = run_losses(tmp_path, lab_cache, "galore", **change)
    with pytest.raises(AssertionError):
        assert_matches_golden(losses, golden_losses("galore"))


@pytest.mark.parametrize("options,same_as", [({}, "galore"), ({"optim__selector": "importance"}, "i3s")])
def test_subspace_method_composes_the_presets_from_options(tmp_path, lab_cache, options, same_as):
    """`--optimizer subspace` takes every choice from the options: its defaults are GaLore's, and
    `--selector importance` is I3S, to the bit (both run here, on this machine)."""
    kw = dict(steps=20, eval_every=0, device="cpu")
    composed = train(make_cfg(tmp_path / "s", lab_cache, optim__method="subspace", **kw, **options))
    preset = train(make_cfg(tmp_path / "p", lab_cache, optim__method=same_as, **kw))
    assert composed.losses == preset.losses
