#!/usr/bin/env bash
# RUSTC_WRAPPER of the fuzz build (scripts/fuzz.sh): cargo calls it as
# `rustc-sancov.sh RUSTC ARGS...`. The crates that read untrusted bytes get
# SanitizerCoverage, the edge counters and comparison hooks libFuzzer steers by (what
# cargo-fuzz passes to every crate); tract and the rest are compiled as for the tests,
# and with the same flags their build is reused from the test build. Only stable
# compiler flags: no RUSTC_BOOTSTRAP.
#
# Which crates: those fuzz/Cargo.toml compiles with debug assertions on (its profile
# overrides). Cargo knows that setting, so an instrumented crate never takes the place
# of the test build's artifact of the same crate, which would not link without libFuzzer.
set -euo pipefail
rustc=$1
shift
for a in "$@"; do
  if [ "$a" = debug-assertions=on ]; then
    exec "$rustc" "$@" -Cpasses=sancov-module \
      -Cllvm-args=-sanitizer-coverage-level=4 \
      -Cllvm-args=-sanitizer-coverage-inline-8bit-counters \
      -Cllvm-args=-sanitizer-coverage-pc-table \
      -Cllvm-args=-sanitizer-coverage-trace-compares \
      --cfg fuzzing
  fi
done
exec "$rustc" "$@"
