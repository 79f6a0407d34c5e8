# Quick start: `make demo` runs the main job, `make test` the whole test suite.
# Both create or reuse the virtual environment (.venv) themselves.
export PYTHONPATH := $(CURDIR)

.PHONY: demo test

test: export HF_HUB_OFFLINE = 1

demo:
	@PY=$$(scripts/env.sh) && $$PY -m petl_apps.demo

test:
	@PY=$$(scripts/env.sh) && $$PY -m pytest -q tests
