#!/usr/bin/env bash
# Set up, then run every test (tiny random-weight models and the real default model).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -ra "$@"
