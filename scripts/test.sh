#!/usr/bin/env bash
# Runs every test of tfmqc. The interop tests check our files in onnxruntime and the
# ONNX checker; this script installs them from PyPI into target/pyenv (once: a stamp
# records the requirements it was made from) and tells the tests where they are.
set -euo pipefail
cd "$(dirname "$0")/.."

req=tests/interop/requirements.txt
venv=target/pyenv
stamp=$venv/.installed-$(sha256sum "$req" | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "scripts/test.sh: installing onnx and onnxruntime into $venv (once)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$req"
  touch "$stamp"
fi
export TFMQC_PYTHON="$PWD/$venv/bin/python"
# Tests that need onnxruntime fail instead of skipping when it is missing.
export TFMQC_REQUIRE_INTEROP=1

# Release mode: the numerical tests run whole UNets for every time step.
cargo test --release --workspace "$@"
