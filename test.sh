#!/usr/bin/env bash
# The test suite: set up the environment if needed, then run pytest.
set -euo pipefail
cd "$(dirname "$0")"
bash scripts/bootstrap.sh
exec .venv/bin/python -m pytest -q "$@"
