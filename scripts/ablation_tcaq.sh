#!/bin/bash
# TCAQ-DM ablation of BENCHMARKS.md (issue #16): each trained model at W8A8, W6A6, W4A8
# and W4A4 with none / TCR / DAQ / PAR / all of TCR, DAQ and PAR, each compiled with a
# reduced calibration (the machine is slow) and measured twice:
#   - per-step denoiser output SQNR against float on the compile's held-out
#     trajectories (`output_sqnr_mean_db` / `output_sqnr_min_db` of --report);
#   - sample PSNR against the float samples (`tfmqc eval`, runtime sampler, int8 kernels);
#     eval fits TCR's per-input-channel factors before checking that QUANT quantizes FLOAT.
# Prints the markdown table on stdout; files, logs and JSON go to ${TCAQ_DIR:-/tmp/tcaq-ablation}.
#
#   scripts/ablation_tcaq.sh [TFMQC] [MODELS...]
#
# TCAQ_VARIANTS="daq all" compiles only those variants again (the others' files in
# TCAQ_DIR are reused; sample PSNR is measured again on every file); TCAQ_PAR sets the
# rounds of --par (default 2), TCAQ_SAMPLES the samples of the PSNR (default 8);
# TCAQ_BITS="4,4" runs (and tabulates) only those bit widths (default: 8,8 6,6 4,8 4,4).
#
# Runs from the repository root.
set -euo pipefail
bin=${1:-target/release/tfmqc}
shift || true
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(ddpm_digits digits_cond)
dir=${TCAQ_DIR:-/tmp/tcaq-ablation}
mkdir -p "$dir"
# Reduced calibration: 8 trajectories of 20 DDIM steps, S = the 20-step set; held-out
# evaluation and samples at 20 steps too.
calib=(--sampling-steps 20 --calib-samples 8 --calib-steps 20 --seed 0)
samples=${TCAQ_SAMPLES:-8}
par=${TCAQ_PAR:-2}
declare -A variant=(
  [none]="--tcr off --daq off --par 0"
  [tcr]="--tcr on --tcr-alpha auto --daq off --par 0"
  [daq]="--tcr off --daq on --par 0"
  [par]="--tcr off --daq off --par $par"
  [all]="--tcr on --tcr-alpha auto --daq on --par $par"
)
order=(none tcr daq par all)
for m in "${models[@]}"; do
  case $m in
    digits_cond) extra=(--scheduler models/digits_cond.scheduler_config.json --calib models/digits_cond.calib.safetensors --guidance-scale 3) ;;
    *) extra=() ;;
  esac
  for wa in ${TCAQ_BITS:-8,8 6,6 4,8 4,4}; do
    w=${wa%,*} a=${wa#*,}
    files=() labels=()
    for v in "${order[@]}"; do
      tag=$m.w$w.a$a.$v
      case " ${TCAQ_VARIANTS:-${order[*]}} " in
        *" $v "*) ;;
        *) files+=("$dir/$tag.onnx") labels+=(--label "$v")
           continue ;;
      esac
      # shellcheck disable=SC2086
      if ! "$bin" "models/$m.onnx" -o "$dir/$tag.onnx" --report "$dir/$tag.json" \
          --weight-bits "$w" --act-bits "$a" ${variant[$v]} "${calib[@]}" "${extra[@]}" \
          > "$dir/$tag.log" 2>&1; then
        echo "FAILED: $tag (see $dir/$tag.log)" >&2
        exit 1
      fi
      files+=("$dir/$tag.onnx") labels+=(--label "$v")
    done
    "$bin" eval "models/$m.onnx" "${files[@]}" "${labels[@]}" --steps 20 --samples "$samples" \
      --seed 0 --json "${extra[@]}" > "$dir/$m.w$w.a$a.eval.json" 2> "$dir/$m.w$w.a$a.eval.log"
  done
done
TCAQ_BITS=${TCAQ_BITS:-8,8 6,6 4,8 4,4} python3 - "$dir" "${models[@]}" <<'PY'
import json, os, sys
d, models = sys.argv[1], sys.argv[2:]
bits = [tuple(int(b) for b in wa.split(",")) for wa in os.environ["TCAQ_BITS"].split()]
order = ["none", "tcr", "daq", "par", "all"]
print("| model | bits | " + " | ".join(order) + " | all − none |")
print("| --- | --- | " + " | ".join("---" for _ in order) + " | --- |")
for m in models:
    for w, a in bits:
        ev = json.load(open(f"{d}/{m}.w{w}.a{a}.eval.json"))
        psnr = {q["label"]: q["sample_psnr_db"]["summary"]["mean"] for q in ev["quant"]}
        cells, means = [], {}
        for v in order:
            r = json.load(open(f"{d}/{m}.w{w}.a{a}.{v}.json"))
            means[v] = r["output_sqnr_mean_db"]
            extra = ""
            t = r.get("tcaq") or {}
            tc = r.get("tcr") or {}
            if v in ("tcr", "all") and tc.get("applied") and tc.get("alpha") is not None:
                extra += f" α{tc['alpha']:g}"
            if v in ("par", "all") and t.get("par_kept") is not None:
                extra += f" (r{t['par_kept']})"
            if v in ("daq", "all") and t.get("daq"):
                n = sum(c["log2"] for c in t["daq"]) if t.get("daq_applied") else 0
                extra += f" [log {n}/{len(t['daq'])}]"
            p = f"{psnr[v]:.1f}" if v in psnr else "–"
            cells.append(f"{r['output_sqnr_mean_db']:.1f} / {r['output_sqnr_min_db']:.1f} · {p}{extra}")
        print(f"| {m} | W{w}A{a} | " + " | ".join(cells) + f" | {means['all'] - means['none']:+.1f} |")
PY
