"""H6 golden losses: for each registered optimizer, a micro LLaMA trained 20 steps on CPU gives
exactly the losses in tests/golden/<name>.txt (one repr'd float per line). Regenerate only on
purpose, after an intended numerical change:

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
RTOL = 2e-4


@pytest.mark.parametrize("name", sorted(set(METHODS) - {"subspace"}))  # subspace: below
def test_golden_losses(tmp_path, lab_cache, name):
    if torch.cuda.is_available():
        pytest.skip("golden losses are exact on CPU only")
    cfg = make_cfg(tmp_path / name, lab_cache, optim__method=name, steps=20, eval_every=0,
                   device="cpu")
    losses = train(cfg).losses
    path = GOLDEN / f"{name}.txt"
    if REGEN:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text("".join(f"{x!r}\n" for x in losses))
    if not path.exists():
        pytest.fail(f"no golden file {path} for optimizer {name!r}; create it with "
                    f"SUBSPACE_REGEN_GOLDEN=1 (see this module's docstring)")
    expected = [float(line) for line in path.read_text().split()]
    # stored on one machine, compared on another: other CPUs (and ATEN_CPU_CAPABILITY) run
    # other kernels, so a tolerance relative to the loss; bitwise equality is tested within a
    # machine (resume, DDP, the 'subspace' method below)
    assert losses == pytest.approx(expected, rel=RTOL, abs=0)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("options,same_as", [({}, "galore"), ({"optim__selector": "importance"}, "i3s")])
def test_subspace_method_composes_the_presets_from_options(tmp_path, lab_cache, options, same_as):
    """`--optimizer subspace` takes every choice from the options: its defaults are GaLore's, and
    `--selector importance` is I3S, to the bit (both run here, on this machine)."""
    kw = dict(steps=20, eval_every=0, device="cpu")
    composed = train(make_cfg(tmp_path / "s", lab_cache, optim__method="subspace", **kw, **options))
    preset = train(make_cfg(tmp_path / "p", lab_cache, optim__method=same_as, **kw))
    assert composed.losses == preset.losses
