# The two commands of the README: `make workbook` (run the workbook on the embedded default model) and
# `make test` (run the tests). Both set up .venv first; set-up is skipped when nothing changed.
PY := .venv/bin/python

.PHONY: setup workbook smoke test test-all lab clean-outputs bench bench-quick

setup:
	@bash scripts/setup.sh

workbook: setup
	@$(PY) -m crvlm_core.cli workbook run

smoke: setup
	@$(PY) -m crvlm_core.cli workbook run --smoke

test: setup
	@$(PY) -m pytest -q

test-all: setup
	@$(PY) -m pytest -q -m ""

# Benchmarks (issue #9): each script under the heavy-job lock, one table at the end; results in outputs/bench/.
# steering-vectors (the peer library) declares transformers<5, so it is installed without its dependencies.
bench: setup
	@$(PY) -c "import steering_vectors" 2>/dev/null || $(PY) -m pip -q install --no-deps "steering-vectors==0.12.2"
	@$(PY) benchmarks/run_all.py

bench-quick: setup
	@$(PY) -c "import steering_vectors" 2>/dev/null || $(PY) -m pip -q install --no-deps "steering-vectors==0.12.2"
	@$(PY) benchmarks/run_all.py --quick

# The per-user `crvlm` kernel the notebooks name is re-pointed at this checkout's venv first (another checkout's
# set-up may have registered its own).
lab: setup
	@$(PY) -c "from crvlm_core.workbook.kernels import ensure_kernel; ensure_kernel()"
	@.venv/bin/jupyter lab workbook/

clean-outputs:
	@find outputs -mindepth 1 -not -name README.md -delete
