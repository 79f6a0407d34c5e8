#!/usr/bin/env bash
# Create the project's virtual environment, or reuse it when requirements.txt has not changed.
# Idempotent; prints the environment's python on stdout. PETL_VENV chooses another folder.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${PETL_VENV:-.venv}
stamp="$venv/.requirements.sha256"
wanted=$(cat requirements.txt pyproject.toml | sha256sum | cut -d" " -f1)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
  echo "Setting up $venv (a few minutes the first time)..." >&2
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip >&2
  "$venv/bin/python" -m pip install -q -r requirements.txt >&2
  "$venv/bin/python" -m pip install -q --no-deps -e . >&2
  echo "$wanted" > "$stamp"
fi
echo "$venv/bin/python"
