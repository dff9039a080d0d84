#!/usr/bin/env bash
# Create .venv and install the five packages (editable) plus test tools. Idempotent:
# a stamp of the install inputs makes a second call a no-op.
#   TORCH_SPEC   torch requirement (default torch==2.13.0; on the project's CPU machines
#                pip finds a local CPU wheel; elsewhere PyPI serves the default build)
#   PYTHON       interpreter used to create the venv (default python3)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp="$VENV/.d2s-install-stamp"
want=$(cat packages/*/pyproject.toml requirements/constraints.txt scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[bootstrap] creating $VENV (torch: $TORCH_SPEC)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -m pip install -q -c requirements/constraints.txt \
  -e packages/core -e "packages/densecap[hf,ray,testing,faiss]" -e "packages/vse[train]" -e "packages/bench[faiss]" \
  -e "packages/ui[faiss]" pytest pytest-timeout ruff scipy selenium 2>&1 | grep -v "^WARNING: Location" || true
"$VENV/bin/python" -c "import d2s, densecap, vse, vse_train, bench, d2s_ui, selenium, torch, transformers, accelerate, webdataset, datasets, ray, tabulate, scipy, datasketch, imagehash" \
  || { echo "[bootstrap] install failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[bootstrap] ready: $VENV" >&2
