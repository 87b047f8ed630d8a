"""Finite Set Calibration: what per-step scales (the default, `--step-groups auto`) gain
over one set of scales (`--step-groups 1`) on every denoiser in models/.

    python3 scripts/fsc_gain.py [--tfmqc PATH] [--bits 8,4] [--workdir DIR] [MODEL...]

Compiles each model per weight width with `--seed 0` and the model's deployment (as
compare_quant.MODEL_ARGS): with one set of scales and exact f32 tables (the default before
issue #15), with the defaults, and with the defaults at S = 1000; prints a markdown table
of the compile reports' per-step output SQNR against float (held-out trajectories of the
deployment sampler, mean / min over the steps), the activations with per-step scales, and
the output files' size against the float file.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
MODEL_ARGS = {
    "unet2d_cond": ["--scheduler", "tests/data/sd15_scheduler_config.json"],
    "unet2d_cond_dynbatch": ["--scheduler", "tests/data/sd15_scheduler_config.json"],
    "sd_tiny": ["--scheduler", "models/sd_tiny.scheduler_config.json"],
    "digits_cond": ["--scheduler", "models/digits_cond.scheduler_config.json",
                    "--calib", "models/digits_cond.calib.safetensors", "--guidance-scale", "3"],
}
DENOISERS = ["ddim_unet", "ddpm_digits", "digits_cond", "guided_unet", "sd_tiny",
             "unet2d_attn", "unet2d_attn_dynbatch", "unet2d_cond", "unet2d_cond_dynbatch"]


def model_bytes(name: str) -> int:
    p = ROOT / "models" / f"{name}.onnx"
    data = p.with_suffix(".onnx.data")
    return p.stat().st_size + (data.stat().st_size if data.exists() else 0)


def compile_one(tfmqc: str, name: str, bits: int, groups: str, work: Path,
                extra: list[str] | None = None, tag: str = "") -> dict:
    out = work / f"{name}.w{bits}.g{groups}{tag}.onnx"
    report = out.with_suffix(".json")
    cmd = [tfmqc, f"models/{name}.onnx", "-o", str(out), "--report", str(report), "--seed", "0",
           "--weight-bits", str(bits), "--step-groups", groups, *MODEL_ARGS.get(name, []),
           *(extra or [])]
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{r.stderr[-3000:]}")
    print(f"[fsc_gain] {name} w{bits} --step-groups {groups}: {time.time() - t0:.0f} s",
          file=sys.stderr, flush=True)
    return json.loads(report.read_text())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tfmqc", default=str(ROOT / "target" / "release" / "tfmqc"))
    ap.add_argument("--bits", default="8")
    ap.add_argument("--workdir", default="/tmp/fsc_gain")
    ap.add_argument("models", nargs="*", default=DENOISERS)
    a = ap.parse_args()
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print("| model | weights | step SQNR dB, one set, f32 tables (mean / min) | step SQNR dB, default (mean / min) "
          "| gain (mean / min) | activations with per-step scales | size / float, default S | size / float, S = 1000 (tables) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in a.models:
        for bits in [int(b) for b in a.bits.split(",")]:
            # Today's default before issue #15: one set of scales, exact f32 tables.
            one = compile_one(a.tfmqc, name, bits, "1", work, ["--table-precision", "f32"])
            fsc = compile_one(a.tfmqc, name, bits, "auto", work)
            big = compile_one(a.tfmqc, name, bits, "auto", work, ["--timesteps", "1000"], ".s1000")
            m1, n1 = one["output_sqnr_mean_db"], one["output_sqnr_min_db"]
            mf, nf = fsc["output_sqnr_mean_db"], fsc["output_sqnr_min_db"]
            acts = len(fsc["activations"])
            print(f"| {name} | W{bits}A8 | {m1:.1f} / {n1:.1f} | {mf:.1f} / {nf:.1f} | "
                  f"{mf - m1:+.1f} / {nf - n1:+.1f} | {fsc['per_step_activations']} of {acts} "
                  f"(≤ {fsc['step_groups']} groups) | {fsc['bytes_out'] / model_bytes(name):.2f}× "
                  f"(S = {fsc['timesteps']}) | {big['bytes_out'] / model_bytes(name):.2f}× "
                  f"({big['bytes_by_kind']['tables'] / 1e3:.0f} kB) |",
                  flush=True)


if __name__ == "__main__":
    main()
