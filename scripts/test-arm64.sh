#!/usr/bin/env bash
# Runs the runtime crate's tests on aarch64 under qemu user-mode emulation, once per CPU
# model, so every arm64 int8 kernel path is checked bit for bit against the portable
# reference on this x86 machine:
#
#   QEMU_CPU=max         dot product + i8mm (+ SVE2, bf16)  -> Auto runs i8mm
#   QEMU_CPU=cortex-a76  dot product, no i8mm                -> Auto runs dotprod
#   QEMU_CPU=cortex-a53  plain NEON                          -> Auto runs neon
#
# The cross toolchain comes from ../shared/arm64 (setup.sh: Debian's aarch64 gcc, qemu-user
# and the std sources of the installed rustc for -Zbuild-std; idempotent, needs root the
# first time). Emulated run times say nothing about speed: see BENCHMARKS.md, "arm64".
#
# Usage: bash scripts/test-arm64.sh [libtest arguments]   (default: the kernel tests and
# the whole-model checks; e.g. `--include-ignored` runs every test of the crate)
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

# The whole-model checks (runtime/src/model_check_tests.rs) need ddpm_digits compiled by
# tfmqc, as the x86 tests compile it: the compiler runs on the host (its output does not
# depend on the machine). The host build is the one of the README's test command (fresh
# after it; built here otherwise); the files are reused while newer than the compiler.
target_dir=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
cargo test --release --workspace --no-run --quiet
tfmqc=$target_dir/release/tfmqc
models=$target_dir/arm64-models
mkdir -p "$models"
compile() { # OUT ARGS...: compile models/ddpm_digits.onnx into $models/OUT unless fresh
  local out=$models/$1
  shift
  if [ ! "$out" -nt "$tfmqc" ] || [ ! "$out" -nt models/ddpm_digits.onnx ]; then
    "$tfmqc" models/ddpm_digits.onnx -o "$out" "$@" 2>"$out.log" || { cat "$out.log" >&2; exit 1; }
  fi
}
# As tests/sample.rs (default options) and tests/int8.rs (quick calibration, S = all).
compile digits.q.onnx
compile digits_all.q.onnx --calib-samples 4 --calib-steps 10 --sampling-steps all
export TFMQC_QUANTIZED_DIGITS=$models/digits.q.onnx
export TFMQC_QUANTIZED_DIGITS_ALL=$models/digits_all.q.onnx
compiled=$(date +%s)
echo "scripts/test-arm64.sh: compiled models ready in $((compiled - start)) s" >&2

shared=${TFMQC_ARM64_DIR:-../shared/arm64}
[ -f "$shared/setup.sh" ] || {
  echo "scripts/test-arm64.sh: $shared/setup.sh not found (set TFMQC_ARM64_DIR)" >&2
  exit 1
}
bash "$shared/setup.sh"
# shellcheck source=/dev/null
source "$shared/env.sh"

target=aarch64-unknown-linux-gnu
# Build once (std from source, then the crate's test binary) in a target directory of its
# own: the cross build needs RUSTC_BOOTSTRAP=1 (-Zbuild-std), which proc-macro2's build
# script watches, so sharing the host's directory would rebuild every proc macro and all
# that depends on them, host and aarch64 in turn, on every switch.
export CARGO_TARGET_DIR=${TFMQC_ARM64_TARGET_DIR:-$target_dir/aarch64-cross}
echo "scripts/test-arm64.sh: building the runtime crate's tests for $target" >&2
bin=$(cargo test -p tfmqc-runtime --release --lib --no-run --target "$target" -Zbuild-std \
  --message-format=json-render-diagnostics |
  python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "tfmqc_runtime":
        print(m["executable"])
')
[ -n "$bin" ] || { echo "scripts/test-arm64.sh: no test binary was built" >&2; exit 1; }
built=$(date +%s)
echo "scripts/test-arm64.sh: built in $((built - compiled)) s: $bin" >&2

qemu=(qemu-aarch64 -L /usr/aarch64-linux-gnu)
# The tests read models/ relative to the crate, as `cargo test` runs them.
cd runtime
status=0
for model in max:i8mm cortex-a76:dotprod cortex-a53:neon; do
  cpu=${model%%:*}
  want=${model#*:}
  t0=$(date +%s)
  # Which kernel path this CPU model gets, and a check that Auto picks the expected one.
  paths=$(QEMU_CPU=$cpu TFMQC_EXPECT_INT8_BACKEND=$want "${qemu[@]}" "$bin" \
    --exact kernels::int8::tests::kernel_paths_of_this_cpu --nocapture --test-threads 1 2>&1) || {
    echo "$paths" >&2
    echo "scripts/test-arm64.sh: QEMU_CPU=$cpu does not run the $want path" >&2
    status=1
    continue
  }
  echo "== QEMU_CPU=$cpu: $(grep -o 'int8 kernel paths.*' <<<"$paths")"
  # Every kernel test and the whole-model check on each model; the sampling check (the
  # slowest under emulation) on `max` only.
  if [ $# -gt 0 ]; then
    filter=("$@")
  elif [ "$cpu" = max ]; then
    filter=(--include-ignored kernels:: model_check_tests::)
  else
    filter=(--include-ignored kernels:: model_check_tests::compiled_digits_on_int8_kernels_match_the_qdq_graph)
  fi
  if QEMU_CPU=$cpu TFMQC_EXPECT_INT8_BACKEND=$want "${qemu[@]}" "$bin" \
    --test-threads 2 "${filter[@]}" 2>&1 | tee "/tmp/tfmqc-arm64-$cpu.log" | grep -E '^test result|FAILED|panicked'; then
    :
  fi
  grep -q '^test result: ok' "/tmp/tfmqc-arm64-$cpu.log" || status=1
  echo "   ($(($(date +%s) - t0)) s under qemu)"
done
echo "scripts/test-arm64.sh: done in $(($(date +%s) - start)) s (model $((compiled - start)) s, aarch64 build $((built - compiled)) s)" >&2
exit $status
