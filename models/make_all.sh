#!/usr/bin/env bash
# Regenerate every file in models/ (run from anywhere; takes ~20-40 min on 2 CPU cores,
# almost all of it DDPM training).  Python defaults to /tmp/mvenv/bin/python; override with PY=...
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-/tmp/mvenv/bin/python}"
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
rm -f models/manifest.json
"$PY" models/train_digits_classifier.py   # digits_features.onnx + digits_features_ref.json (needed for the DDPM's FD)
"$PY" models/train_ddpm_digits.py         # ddpm_digits.* (trains ~3500 steps, then DDIM samples via onnxruntime)
"$PY" models/export_diffusers_unets.py    # unet2d_attn*.onnx, unet2d_cond*.onnx
"$PY" models/export_guided_unet.py        # guided_unet.onnx (dynamo exporter)
"$PY" models/export_ddim_unet.py          # ddim_unet.onnx (opset 13)
"$PY" models/make_conv3x3.py            # conv3x3_64.onnx + .q.onnx (one layer, for int8 kernel timing)
"$PY" models/export_sd15_unet.py --tiny --force   # sd_tiny.onnx + .onnx.data (SD-1.5 topology, narrow; external data)
# The SD-1.5-sized exports (3.4 GB each, not committed) are made on demand into target/sd15/:
#   "$PY" models/export_sd15_unet.py --latent 64    (also --latent 32, --latent 16)
"$PY" models/check_all.py                 # re-verify all models from the shipped safetensors
