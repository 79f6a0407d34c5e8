# Quick start: `make demo` runs the main job, `make serve` then serves its two tasks (words and noise, on the
# demo's one backbone) over HTTP and prints the page's address, `make test` runs the whole test suite.
# All three create or reuse the virtual environment (.venv) themselves. Options of the server:
# make serve ARGS="--port 8001" (python -m petl_apps.demo_serve --help).
export PYTHONPATH := $(CURDIR)

.PHONY: demo serve test

test serve: export HF_HUB_OFFLINE = 1

demo:
	@PY=$$(scripts/env.sh) && $$PY -m petl_apps.demo

serve:
	@PY=$$(scripts/env.sh) && $$PY -m petl_apps.demo_serve $(ARGS)

test:
	@PY=$$(scripts/env.sh) && $$PY -m pytest -q tests
