#!/bin/bash
# TCAQ table of BENCHMARKS.md: compiles one model at one bit width with or without TCR
# and appends "model  WxAy  tcr  alpha  mean  min" (per-step output SQNR against float
# on the held-out trajectories of the compile summary, dB) to OUT.
#
#   scripts/tcaq_sweep.sh OUT MODEL WBITS ABITS on|off ALPHA [TFMQC]
#
# Runs from the repository root; the model's deployment flags are those of
# scripts/compare_quant.py. Outputs go to ${TCAQ_DIR:-/tmp/tcaq}.
set -euo pipefail
out=$1 m=$2 w=$3 a=$4 tcr=$5 alpha=$6
bin=${7:-target/release/tfmqc}
dir=${TCAQ_DIR:-/tmp/tcaq}
mkdir -p "$dir"
case $m in
  digits_cond) extra=(--scheduler models/digits_cond.scheduler_config.json --calib models/digits_cond.calib.safetensors --guidance-scale 3) ;;
  unet2d_cond|unet2d_cond_dynbatch) extra=(--scheduler tests/data/sd15_scheduler_config.json) ;;
  sd_tiny) extra=(--scheduler models/sd_tiny.scheduler_config.json) ;;
  *) extra=() ;;
esac
tag=$m.w$w.a$a.tcr$tcr.al$alpha
if ! "$bin" "models/$m.onnx" -o "$dir/$tag.onnx" --report "$dir/$tag.json" \
    --weight-bits "$w" --act-bits "$a" --tcr "$tcr" --tcr-alpha "$alpha" "${extra[@]}" \
    > "$dir/$tag.log" 2>&1; then
  printf '%s\tW%sA%s\t%s\t%s\tFAILED\n' "$m" "$w" "$a" "$tcr" "$alpha" >> "$out"
  exit 1
fi
python3 - "$dir/$tag.json" "$m" "W${w}A${a}" "$tcr" "$alpha" >> "$out" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print("\t".join(sys.argv[2:] + ["%.2f" % r["output_sqnr_mean_db"], "%.2f" % r["output_sqnr_min_db"]]))
PY
