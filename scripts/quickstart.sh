#!/usr/bin/env bash
# The main job: install what is needed, then run the CPU quickstart pipeline end to end.
# Extra arguments go to `d2s run` (e.g. vars.seed=1, --dry-run, --from train_d2s).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
# --jobs 2: the side arms (align only, pre-training + align, the benches) run beside stage 1 and
# D2S on the core those leave idle (docs/pipeline-format.md); the numbers are those of --jobs 1.
exec .venv/bin/d2s run pipelines/quickstart.yaml --jobs 2 "$@"
