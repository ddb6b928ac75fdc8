#!/usr/bin/env bash
# Mutation testing with mutmut: the library (src/subspace_optim) and the lab's checkpoint, data and
# schedule code, against the fast test selection in pyproject.toml's [tool.mutmut]. Not part of CI:
# all mutants take many hours on 2 cores (docs/testing.md, "Mutation testing").
#
#   bash scripts/mutation.sh                           # every mutant, then the summary
#   MUTATION_SAMPLE=300 bash scripts/mutation.sh       # a seeded random sample (MUTATION_SEED, 0)
#   MUTATION_RESUME=1 bash scripts/mutation.sh NAME... # re-run some mutants (e.g. the survivors)
#   bash scripts/mutation.sh --summary                 # the summary of the last run only
#
# The summary (mutants/summary.txt) counts killed, survived and timed-out mutants (of the sample, if
# one was drawn), lists the survivors, and gives the score with the equivalent mutants of
# scripts/mutation_equivalent.txt left out (no test can tell them from the original).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
.venv/bin/python -c "import mutmut" 2>/dev/null || .venv/bin/python -m pip install -q -e ".[mutation]"
# tiny tensors: one thread each is faster, and forked workers must not inherit a busy OpenMP pool
export OMP_NUM_THREADS=1
mutmut() { nice -n 10 .venv/bin/mutmut "$@"; }
run() {
  mutmut run --max-children "${MUTATION_JOBS:-2}" "$@" >> mutants/run.log 2>&1 || { tail -40 mutants/run.log; exit 1; }
}
if [ "${1:-}" != "--summary" ]; then
  [ "${MUTATION_RESUME:-0}" = 1 ] || rm -rf mutants
  mkdir -p mutants
  if [ -n "${MUTATION_SAMPLE:-}" ] && [ $# -eq 0 ]; then
    # mutants and test statistics only: no mutant has this name, so mutmut stops after them
    mutmut run --max-children "${MUTATION_JOBS:-2}" "__generate_only__" >> mutants/run.log 2>&1 || true
    [ -f mutants/mutmut-stats.json ] || { tail -40 mutants/run.log; exit 1; }
    mutmut results --all true | .venv/bin/python -c "
import random, sys
names = sorted(line.split(':')[0].strip() for line in sys.stdin if '__mutmut_' in line)
random.Random(${MUTATION_SEED:-0}).shuffle(names)
print('\n'.join(sorted(names[:${MUTATION_SAMPLE}])))" > mutants/sample.txt
    mapfile -t names < mutants/sample.txt
    run "${names[@]}"
  else
    run "$@"
  fi
fi
mutmut results --all true > mutants/results.txt
.venv/bin/python - <<'PY'
from collections import Counter
from pathlib import Path

status = {}
for line in Path("mutants/results.txt").read_text().splitlines():
    name, _, result = line.strip().rpartition(": ")
    if "__mutmut_" in name:
        status[name] = result
sample = Path("mutants/sample.txt")
if sample.exists():
    status = {n: status[n] for n in sample.read_text().split() if n in status}
equivalent = {line.split("#")[0].strip() for line in Path("scripts/mutation_equivalent.txt").read_text().splitlines()}
equivalent.discard("")
counts = Counter(status.values())
survivors = sorted(n for n, r in status.items() if r == "survived")
counted = [n for n, r in status.items() if r in ("killed", "survived", "timeout") and n not in equivalent]
killed = [n for n in counted if status[n] in ("killed", "timeout")]
core = [n for n in counted if n.startswith("subspace_optim.")]
core_killed = [n for n in core if status[n] in ("killed", "timeout")]
pct = lambda a, b: f"{len(a)}/{len(b)} = {100 * len(a) / max(1, len(b)):.1f}%"
lines = [
    f"mutants{' (sample)' if sample.exists() else ''}: {len(status)}; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
    f"equivalent (scripts/mutation_equivalent.txt) among them: {len(equivalent & set(status))}",
    f"score, equivalent mutants left out: {pct(killed, counted)}",
    f"library (subspace_optim) score: {pct(core_killed, core)}",
    "survivors not listed as equivalent:",
    *[f"  {n}" for n in survivors if n not in equivalent],
]
Path("mutants/summary.txt").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PY
