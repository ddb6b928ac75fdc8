#!/usr/bin/env bash
# Mutation testing with mutmut: the library (src/subspace_optim) and the lab's checkpoint, data and
# schedule code, against the fast test selection in pyproject.toml's [tool.mutmut]. Not part of CI:
# a full run takes hours on 2 cores (docs/testing.md, "Mutation testing").
#
#   bash scripts/mutation.sh                  # fresh run, then the summary
#   MUTATION_RESUME=1 bash scripts/mutation.sh NAME...   # re-run some mutants (e.g. the survivors)
#   bash scripts/mutation.sh --summary        # the summary of the last run only
#
# The summary (mutants/summary.txt) counts mutants killed, survived and timed out, lists the
# survivors, and gives the score with the mutants of scripts/mutation_equivalent.txt left out
# (equivalent mutants: no test can tell them from the original).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -c "import mutmut" 2>/dev/null || .venv/bin/python -m pip install -q -e ".[mutation]"
# tiny tensors: one thread each is faster, and forked workers must not inherit a busy OpenMP pool
export OMP_NUM_THREADS=1
if [ "${1:-}" != "--summary" ]; then
  [ "${MUTATION_RESUME:-0}" = 1 ] || rm -rf mutants
  nice -n 10 .venv/bin/mutmut run --max-children "${MUTATION_JOBS:-2}" "$@" > mutants.log 2>&1 || {
    tail -40 mutants.log; exit 1; }
  mv mutants.log mutants/run.log
fi
.venv/bin/mutmut export-cicd-stats > /dev/null
.venv/bin/mutmut results --all true > mutants/results.txt
.venv/bin/python - <<'PY'
import json
from pathlib import Path

stats = json.loads(Path("mutants/mutmut-cicd-stats.json").read_text())
status = {}
for line in Path("mutants/results.txt").read_text().splitlines():
    name, _, result = line.strip().rpartition(": ")
    if name:
        status[name] = result
equivalent = {line.split("#")[0].strip() for line in Path("scripts/mutation_equivalent.txt").read_text().splitlines()}
equivalent.discard("")
survivors = sorted(n for n, r in status.items() if r == "survived")
counted = [n for n, r in status.items() if r in ("killed", "survived", "timeout") and n not in equivalent]
killed = [n for n in counted if status[n] in ("killed", "timeout")]
core = [n for n in counted if n.startswith("subspace_optim.")]
core_killed = [n for n in core if status[n] in ("killed", "timeout")]
lines = [
    f"mutants: {stats['total']}; killed {stats['killed']}, timeout {stats['timeout']}, survived {stats['survived']}, "
    f"no tests {stats['no_tests']}, suspicious {stats['suspicious']}, skipped {stats['skipped']}, segfault {stats['segfault']}",
    f"equivalent (scripts/mutation_equivalent.txt, present in this run): {len(equivalent & set(status))}",
    f"score, equivalent mutants left out: {len(killed)}/{len(counted)} = {100 * len(killed) / max(1, len(counted)):.1f}%",
    f"library (subspace_optim) score: {len(core_killed)}/{len(core)} = {100 * len(core_killed) / max(1, len(core)):.1f}%",
    "survivors not listed as equivalent:",
    *[f"  {n}" for n in survivors if n not in equivalent],
]
Path("mutants/summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
