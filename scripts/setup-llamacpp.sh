#!/usr/bin/env bash
# llama-cpp-python for GGUF models (cag.engines.llamacpp), built from source for this CPU.
#
# PyPI has no binary wheel of it, so pip compiles llama.cpp: about 12 minutes on 2 cores, once per CPU.
# The wheel is kept under ~/.cache/cag/wheels/<cpu>/ and reinstalled from there; pip's own wheel cache is
# not used, since it would hand a wheel built for one CPU to another (an illegal instruction at the first
# matrix multiply). The instruction sets are named explicitly from /proc/cpuinfo instead of -march=native,
# which also turns on AMX tiles on CPUs that list them, and some virtual machines fault on those.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36  # and its source archive's hash in requirements/llama-cpp-python.txt (scripts/lock.sh)
PY=.venv/bin/python
"$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null && exit 0
PIP=("$PY" -m pip install --quiet --disable-pip-version-check)
ARGS="-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
if [ "$(uname -m)" = x86_64 ]; then
  FLAGS=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)
  has() { case " $FLAGS " in *" $1 "*) echo ON ;; *) echo OFF ;; esac; }
  ARGS="$ARGS -DGGML_NATIVE=OFF -DGGML_AVX=$(has avx) -DGGML_AVX2=$(has avx2) -DGGML_FMA=$(has fma)"
  ARGS="$ARGS -DGGML_F16C=$(has f16c) -DGGML_BMI2=$(has bmi2) -DGGML_AVX_VNNI=$(has avx_vnni)"
  ARGS="$ARGS -DGGML_AVX512=$(has avx512f) -DGGML_AVX512_VBMI=$(has avx512vbmi)"
  ARGS="$ARGS -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16)"
  KEY=$(echo "$VERSION $ARGS" | sha256sum | cut -c1-16)
else
  KEY=$(echo "$VERSION $(uname -m) $(grep -m1 -i '^features' /proc/cpuinfo || true)" | sha256sum | cut -c1-16)
fi
WHEELS=${CAG_WHEELS:-$HOME/.cache/cag/wheels}/$KEY
if ! ls "$WHEELS"/llama_cpp_python-$VERSION-*.whl >/dev/null 2>&1; then
  echo "building llama-cpp-python $VERSION for this CPU (about 12 minutes on 2 cores, once)..." >&2
  mkdir -p "$WHEELS"
  CMAKE_ARGS="$ARGS" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) "$PY" -m pip wheel --quiet --disable-pip-version-check \
    --no-cache-dir --no-deps --no-binary llama-cpp-python --require-hashes -r requirements/llama-cpp-python.txt \
    -w "$WHEELS"
fi
"${PIP[@]}" "numpy>=1.20" "diskcache>=5.6" "jinja2>=2.11" "typing-extensions>=4.5"
"${PIP[@]}" --no-deps --force-reinstall "$WHEELS"/llama_cpp_python-$VERSION-*.whl
echo "llama-cpp-python $VERSION installed ($WHEELS)" >&2
