#!/bin/bash
# Which quantized layer costs the most output SQNR (issue #16, W6A6 follow-up): compiles
# MODEL once as given and once per quantized layer with that layer `--keep-float`, and
# prints a markdown table of each layer's mean step SQNR and its first two steps (t = 0
# is where ddpm_digits' worst step is), sorted by the gain, from the compiles' `--report`.
#
#   scripts/keep_float_sweep.sh TFMQC MODEL.onnx [tfmqc flags...]
#
# e.g. scripts/keep_float_sweep.sh target/release/tfmqc models/ddpm_digits.onnx \
#        --weight-bits 6 --act-bits 6 --daq off --tcr off --par 0 \
#        --sampling-steps 20 --calib-samples 8 --calib-steps 20 --seed 0
#
# KF_JOBS compiles run at once (default 2: the machine is shared); files, logs and JSON
# go to ${KF_DIR:-/tmp/keep-float-sweep}. Runs from the repository root.
set -euo pipefail
bin=${1:?usage: scripts/keep_float_sweep.sh TFMQC MODEL.onnx [tfmqc flags...]}
model=${2:?usage: scripts/keep_float_sweep.sh TFMQC MODEL.onnx [tfmqc flags...]}
shift 2
flags=("$@")
dir=${KF_DIR:-/tmp/keep-float-sweep}
jobs=${KF_JOBS:-2}
mkdir -p "$dir"
compile() { # TAG [extra flags...]
  local tag=$1
  shift
  if ! "$bin" "$model" -o "$dir/$tag.onnx" --report "$dir/$tag.json" "${flags[@]}" "$@" \
      > "$dir/$tag.log" 2>&1; then
    echo "FAILED: $tag (see $dir/$tag.log)" >&2
    return 1
  fi
}
compile base
# The quantized layers, in the order quantize rewrote them.
mapfile -t layers < <(python3 -c '
import json, sys
for l in json.load(open(sys.argv[1]))["layers"]:
    print(l["node"])
' "$dir/base.json")
pids=()
for i in "${!layers[@]}"; do
  compile "kf$i" --keep-float "${layers[$i]}" &
  pids+=($!)
  if (( ${#pids[@]} >= jobs )); then
    wait "${pids[0]}"
    pids=("${pids[@]:1}")
  fi
done
for p in "${pids[@]}"; do wait "$p"; done
python3 - "$dir" "${layers[@]}" <<'PY'
import json, sys
d, layers = sys.argv[1], sys.argv[2:]
def load(tag):
    r = json.load(open(f"{d}/{tag}.json"))
    per_step = r["output_sqnr_per_step"]
    return r["output_sqnr_mean_db"], [s["sqnr_db"] for s in per_step], [s["t"] for s in per_step]
base, base_steps, ts = load("base")
rows = []
for i, node in enumerate(layers):
    mean, steps, _ = load(f"kf{i}")
    rows.append((mean - base, node, mean, steps))
rows.sort(key=lambda r: -r[0])
print(f"base: {base:.2f} dB mean, t = {ts[0]}: {base_steps[0]:.1f} dB, t = {ts[1]}: {base_steps[1]:.1f} dB")
print()
print(f"| layer kept in float | mean (dB) | gain | t = {ts[0]} | t = {ts[1]} |")
print("| --- | --- | --- | --- | --- |")
for gain, node, mean, steps in rows:
    print(f"| `{node}` | {mean:.2f} | {gain:+.2f} | {steps[0]:.1f} | {steps[1]:.1f} |")
PY
