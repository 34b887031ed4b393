#!/usr/bin/env bash
# scripts/gpu_check.sh [OUT] — on a machine with a CUDA GPU: the GPU tests (pytest -m gpu), the smoke workbook and
# the quick benchmarks, all on the GPU (load_model picks CUDA when torch sees it), and what the machine is.
# Results under OUT (default outputs/gpu/<UTC time>/): gpu_check.json (each step's exit code and seconds),
# machine.txt, pytest-gpu.txt + junit.xml, workbook.txt (notebooks under outputs/gpu-smoke/), bench/*.json.
# Needs: an NVIDIA driver, and a CUDA build of torch in .venv (scripts/setup.sh installs the default PyPI build where
# nvidia-smi works; CRVLM_TORCH="torch==2.13.0" or another requirement overrides it). Exit 2 without a usable GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu/$(date -u +%Y%m%dT%H%M%SZ)}
PY=.venv/bin/python
bash scripts/setup.sh || { echo "gpu_check: scripts/setup.sh failed" >&2; exit 2; }
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi missing or finds none): nothing to check" >&2; exit 2
fi
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: torch $($PY -c 'import torch; print(torch.__version__)') in .venv sees no CUDA GPU (a CPU build?):" \
       "remove .venv and rerun, or set CRVLM_TORCH to a CUDA build" >&2; exit 2
fi
mkdir -p "$OUT"
{ nvidia-smi; $PY -c "import torch, transformers, nnsight; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'| transformers', transformers.__version__, '| nnsight', nnsight.__version__); print(torch.cuda.get_device_name(0))"
} > "$OUT/machine.txt" 2>&1
steps=()
run() {  # run NAME LOGFILE COMMAND...: time one step, keep going when it fails
  local name=$1 log=$2; shift 2
  local start=$SECONDS
  echo "[gpu_check] $name …"
  "$@" > "$log" 2>&1
  local rc=$?
  echo "[gpu_check] $name: exit $rc in $((SECONDS - start)) s (log: $log)"
  steps+=("\"$name\": {\"rc\": $rc, \"seconds\": $((SECONDS - start)), \"log\": \"$log\"}")
}
run tests "$OUT/pytest-gpu.txt" $PY -m pytest -q -m gpu --junitxml "$OUT/junit.xml" tests/test_gpu.py
run remote_tests "$OUT/pytest-remote.txt" $PY -m pytest -q tests/test_remote.py tests/test_vllm_engine.py
run smoke_workbook "$OUT/workbook.txt" $PY -m crvlm_core.cli workbook run --smoke --run gpu-smoke
run benchmarks "$OUT/bench.txt" $PY benchmarks/run_all.py --quick --no-lock --out "$OUT/bench"
joined=$(IFS=,; echo "${steps[*]}")
echo "{\"out\": \"$OUT\", \"steps\": {$joined}}" > "$OUT/gpu_check.json"
echo "[gpu_check] done: $OUT/gpu_check.json"
grep -q '"rc": [1-9]' "$OUT/gpu_check.json" && exit 1
exit 0
