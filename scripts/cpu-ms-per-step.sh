#!/bin/bash
# CPU milliseconds per denoiser step of the int8 runtime, for comparing two binaries on a
# shared machine: wall-clock minima move by 2x there when other jobs hold the cores, CPU
# time much less (it still counts a busy SMT sibling's slowdown). Runs `tfmqc bench` with
# 110 and with 10 timed calls under `perf stat -e task-clock` and divides the difference
# by 100, so loading, warm-up and process start cancel out.
#
#   scripts/cpu-ms-per-step.sh BIN MODEL.onnx QUANTIZED.onnx [THREADS]
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 BIN MODEL.onnx QUANTIZED.onnx [THREADS]" >&2
  exit 2
fi
bin=$1; model=$2; q=$3; t=${4:-1}
cpu_ms() {
  perf stat -x, -e task-clock "$bin" bench "$model" --quantized "$q" --engines tfmqc-int8 \
    --threads "$t" --runs "$1" --steps 10 --loop-runs 0 2>&1 >/dev/null |
    grep task-clock | cut -d, -f1
}
a=$(cpu_ms 10)
b=$(cpu_ms 110)
python3 -c "print('$(basename "$model" .onnx) $(basename "$bin") threads=$t: %.2f CPU ms/step' % (($b - $a) / 100))"
