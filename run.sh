#!/usr/bin/env bash
# The main job: set up the environment if needed, then run the embedded-default comparison.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/bootstrap.sh
exec .venv/bin/subspace compare "$@"
