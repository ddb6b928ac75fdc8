"""The tests whose tolerances depend on CPU kernels pass under lower CPU capabilities too
(docs/testing.md, "Portability").

Each capability runs the selected tests in a subprocess with ``ATEN_CPU_CAPABILITY`` set (torch reads
it once, at start-up), on one thread. The selection: the golden losses, compared across machines,
and the tests that compare computed values against a reference with a tolerance (closed forms,
reference implementations, the fast Gram path, orthonormality). Bitwise tests are left out: they
compare two runs in one process, on the same kernels.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SELECTION = [
    "tests/lab/test_lab_golden.py",
    "tests/test_projected_update.py",
    "tests/test_properties.py",
    "tests/test_osd.py",
    "tests/test_ldadam.py",
    "tests/test_linalg.py",
    "tests/test_transitions.py",
    "tests/test_inner_rules.py",
    "tests/test_subspace.py::test_s3_orthonormal_basis_after_every_refresh",
    "tests/test_subspace.py::test_s4_update_lies_in_the_subspace",
    "tests/test_generic.py::test_g19_identity_subspace_matches_adamw",
]


def cpu_has_avx2() -> bool:
    # not torch's capability: under ATEN_CPU_CAPABILITY=default (a whole-suite run) it says DEFAULT
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        return " avx2" in cpuinfo.read_text()
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@pytest.mark.parametrize("capability", ["default", "avx2"])
def test_tolerance_sensitive_tests_pass_under_cpu_capability(capability, tmp_path):
    if capability == "avx2" and not cpu_has_avx2():
        pytest.skip("this CPU has no AVX2 kernels")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": capability, "OMP_NUM_THREADS": "1",
           "SUBSPACE_EXPECT_CPU_CAPABILITY": capability.upper()}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
         *SELECTION],
        cwd=ROOT, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout.splitlines()[-1]
