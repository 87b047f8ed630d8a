#!/usr/bin/env bash
# Fuzzes every reader of untrusted bytes (issue #20) for SECONDS each with libFuzzer and
# prints one line per target:
#
#     target NAME ok (N runs)            or
#     target NAME FAILED: <what libFuzzer found> (input: PATH, log: PATH)
#
#     bash scripts/fuzz.sh SECONDS [TARGET...]      (default: every target)
#
# The engine is libFuzzer (the libfuzzer-sys crate, as cargo-fuzz uses it) built on
# stable Rust: fuzz/rustc-sancov.sh adds SanitizerCoverage to the crates that read the
# bytes, and everything else (tract) is the test build's own artifacts when
# CARGO_TARGET_DIR is shared with `scripts/test.sh` (CI runs that first; fuzz/Cargo.toml
# keeps the two workspaces' features aligned so that it is): the build then compiles
# libFuzzer, our crates and one binary holding every target (TFMQC_FUZZ_TARGET picks
# one), where cargo-fuzz (RUSTC_BOOTSTRAP=1 for its nightly flags) instruments and
# rebuilds all of tract: it had not finished after 19 minutes on this project's shared
# build machine. No sanitizer: the bugs looked for
# are panics, overflows (checked in our crates), aborts, allocations over libFuzzer's
# limit and hangs.
#
# Corpora grow in $CARGO_TARGET_DIR/fuzz/corpus/NAME (kept between runs: a longer run
# continues from there); the committed seeds (fuzz/seeds) and past crashes
# (fuzz/regressions) are read every time. A crashing input lands in
# $CARGO_TARGET_DIR/fuzz/artifacts/NAME/: fix the bug, copy the input to
# fuzz/regressions/NAME/ (tests/fuzz_corpus.rs runs the command line over every file
# there) and add a test naming what it found.
set -euo pipefail
cd "$(dirname "$0")/.."

secs=${1:?usage: scripts/fuzz.sh SECONDS [TARGET...]}
shift
all=(onnx_import onnx_external denoiser_load calib_tensors scheduler_config)
targets=("${@:-${all[@]}}")

# Seed folder of each target.
seeds_of() {
  case $1 in
    onnx_import | denoiser_load) echo fuzz/seeds/onnx ;;
    onnx_external) echo fuzz/seeds/onnx_external ;;
    calib_tensors) echo fuzz/seeds/calib ;;
    scheduler_config) echo fuzz/seeds/scheduler ;;
    *) echo "scripts/fuzz.sh: unknown target '$1' (known: ${all[*]})" >&2; exit 2 ;;
  esac
}
for t in "${targets[@]}"; do seeds_of "$t" >/dev/null; done

target_dir=$(realpath -m "${CARGO_TARGET_DIR:-target}")
out=$target_dir/fuzz
mkdir -p "$out"
# libFuzzer itself is C++, compiled by libfuzzer-sys's build script.
command -v c++ >/dev/null || {
  echo "scripts/fuzz.sh: libFuzzer needs a C++ compiler (c++); installing g++" >&2
  apt-get update -qq && apt-get install -y -qq g++ >/dev/null
}
start=$(date +%s)
RUSTC_WRAPPER=$PWD/fuzz/rustc-sancov.sh CARGO_TARGET_DIR=$target_dir \
  cargo build --release --manifest-path fuzz/Cargo.toml --bin tfmqc-fuzz >"$out/build.log" 2>&1 || {
  tail -n 30 "$out/build.log" >&2
  echo "scripts/fuzz.sh: building the fuzz targets failed (log: $out/build.log)" >&2
  exit 2
}
echo "scripts/fuzz.sh: built the targets in $(( $(date +%s) - start )) s" >&2

bin=$target_dir/release/tfmqc-fuzz
failed=0
for t in "${targets[@]}"; do
  corpus=$out/corpus/$t
  artifacts=$out/artifacts/$t
  log=$out/logs/$t.log
  mkdir -p "$corpus" "$artifacts" "$out/logs"
  dirs=("$corpus" "$(seeds_of "$t")")
  [ -d "fuzz/regressions/$t" ] && dirs+=("fuzz/regressions/$t")
  # -rss_limit_mb (and the malloc limit it implies): a declared size must be refused
  # before it is allocated, so a 2 GiB allocation is a finding, not a slow run.
  # -timeout: an input that takes a minute (loading a seed UNet takes under a second)
  # is a hang worth a look.
  if TFMQC_FUZZ_TARGET=$t TFMQC_FUZZ_DIR=$out/work/$t "$bin" -max_total_time="$secs" -timeout=60 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$artifacts/" "${dirs[@]}" >"$log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
    echo "target $t ok (${runs:-?} runs)"
  else
    failed=1
    what=$(grep -m1 -E "panicked at|ERROR: libFuzzer|SUMMARY: libFuzzer" "$log" || tail -n 1 "$log")
    input=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n 1)
    echo "target $t FAILED: $what (input: ${input:-none}, log: $log)"
    grep -A3 -m1 "panicked at" "$log" | tail -n +2 || true
  fi
done
exit $failed
