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
# tests/python_api.rs runs `pip install .` in a fresh environment from these wheels.
wheel_req=tests/python/requirements.txt
wheels=target/wheelhouse
wheel_stamp=$wheels/.complete
if [ ! -f "$wheel_stamp" ] || ! cmp -s "$wheel_req" "$wheel_stamp"; then
  echo "scripts/test.sh: downloading maturin and numpy into $wheels (once)" >&2
  rm -rf "$wheels"
  "$venv/bin/pip" download --quiet --disable-pip-version-check --dest "$wheels" -r "$wheel_req"
  cp "$wheel_req" "$wheel_stamp"
fi
command -v cc >/dev/null || {
  echo "scripts/test.sh: tests/c_api.rs needs a C compiler (cc); installing gcc" >&2
  apt-get update -qq && apt-get install -y -qq gcc >/dev/null
}
export TFMQC_PYTHON="$PWD/$venv/bin/python" TFMQC_WHEELHOUSE="$PWD/$wheels"
# Tests that need onnxruntime fail instead of skipping when it is missing.
export TFMQC_REQUIRE_INTEROP=1

# Release mode: the numerical tests run whole UNets for every time step.
# With no arguments (the README's command, CI) the test binaries run two at a time
# (scripts/run_tests.py: most tests keep one core busy, and cargo runs binaries one after
# the other); any argument means plain `cargo test` with those arguments (filters, -p ...).
if [ $# -eq 0 ] || { [ $# -eq 1 ] && [ "$1" = --no-fail-fast ]; }; then
  exec python3 scripts/run_tests.py
fi
cargo test --release --workspace "$@"
