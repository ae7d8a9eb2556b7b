#!/usr/bin/env bash
# The main job: set up, build the bundled sample knowledge base with the default model, answer its questions.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/cag build examples/sample_kb/docs --name sample
.venv/bin/cag ask sample --questions examples/sample_kb/questions.jsonl --max-new-tokens 64
