# The two commands of the README: `make workbook` (run the workbook on the embedded default model) and
# `make test` (run the tests). Both set up .venv first; set-up is skipped when nothing changed.
PY := .venv/bin/python

.PHONY: setup workbook smoke test test-all lab clean-outputs

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

lab: setup
	@.venv/bin/jupyter lab workbook/

clean-outputs:
	@find outputs -mindepth 1 -not -name README.md -delete
