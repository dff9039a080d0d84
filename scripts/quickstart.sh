#!/usr/bin/env bash
# The main job: install what is needed, then run the CPU quickstart pipeline end to end.
# Extra arguments go to `d2s run` (e.g. vars.seed=1, --dry-run, --from train_d2s).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
exec .venv/bin/d2s run pipelines/quickstart.yaml "$@"
