"""Finite Set Calibration: what per-step scales (the default, `--step-groups auto`) gain
over one set of scales (`--step-groups 1`) on every denoiser in models/.

    python3 scripts/fsc_gain.py [--tfmqc PATH] [--bits 8,4] [--workdir DIR]
                                [--eval-samples N] [--no-s1000] [MODEL...]

Compiles each model per weight width with `--seed 0` and the model's deployment (as
compare_quant.MODEL_ARGS): with one set of scales and every temporal feature an exact
f32 table (`--step-groups 1 --tib lut --table-precision f32`, the defaults before issue
#15), with the defaults, and with the defaults at S = 1000; prints a markdown table of
the compile reports' per-step output SQNR against float (held-out trajectories of the
deployment sampler, mean / min over the steps), the activations with per-step scales, and
the output files' size against the float file. `--eval-samples N` measures on N held-out
images per step count (the compiler's `--eval-samples`; default: the compiler's, 2) and adds
the gain on each half of them (their disagreement is the held-out set's own noise);
`--no-s1000` skips the S = 1000 compile (its column shows "–"); `--reuse` keeps the
reports already in the work folder (a compile is deterministic for its options and
binary: only the missing ones run).
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


REUSE = False


def compile_one(tfmqc: str, name: str, bits: int, groups: str, work: Path,
                extra: list[str] | None = None, tag: str = "") -> dict:
    out = work / f"{name}.w{bits}.g{groups}{tag}.onnx"
    report = out.with_suffix(".json")
    if REUSE and report.exists():
        return json.loads(report.read_text())
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
    ap.add_argument("--eval-samples", type=int, default=None)
    ap.add_argument("--no-s1000", action="store_true")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("models", nargs="*", default=DENOISERS)
    a = ap.parse_args()
    global REUSE
    REUSE = a.reuse
    ev = ["--eval-samples", str(a.eval_samples)] if a.eval_samples else []
    tag = f".e{a.eval_samples}" if a.eval_samples else ""
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    print("| model | weights | step SQNR dB, one set, exact f32 tables (mean / min) | step SQNR dB, default (mean / min) "
          "| gain (mean / min) | gain on each half of the held-out images (mean / min; noise) "
          "| activations with per-step scales | size / float, default S | size / float, S = 1000 (tables) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for name in a.models:
        for bits in [int(b) for b in a.bits.split(",")]:
            # The default before issue #15: one set of scales, every temporal feature an
            # exact f32 table (`--tib lut`; `--tib auto`, the default since, computes some
            # with TIAR's quantized layers when f32 tables overrun the budget).
            one = compile_one(a.tfmqc, name, bits, "1", work,
                              ["--tib", "lut", "--table-precision", "f32", *ev], tag + ".lut")
            fsc = compile_one(a.tfmqc, name, bits, "auto", work, ev, tag)
            big = None if a.no_s1000 else compile_one(a.tfmqc, name, bits, "auto", work,
                                                       ["--timesteps", "1000"], ".s1000")
            m1, n1 = one["output_sqnr_mean_db"], one["output_sqnr_min_db"]
            mf, nf = fsc["output_sqnr_mean_db"], fsc["output_sqnr_min_db"]
            acts = len(fsc["activations"])
            # The gain on each half of the held-out images; half their gap is the spread
            # to expect of the whole set's gain (the held-out set's own noise).
            gains = [(h["output_sqnr_mean_db"] - g["output_sqnr_mean_db"],
                      h["output_sqnr_min_db"] - g["output_sqnr_min_db"])
                     for g, h in zip(one.get("output_sqnr_halves", []),
                                     fsc.get("output_sqnr_halves", []))]
            halves = " · ".join(f"{m:+.2f} / {n:+.2f}" for m, n in gains)
            if len(gains) == 2:
                halves += (f" (noise ±{abs(gains[0][0] - gains[1][0]) / 2:.2f} / "
                           f"±{abs(gains[0][1] - gains[1][1]) / 2:.2f})")
            s1000 = "–" if big is None else (f"{big['bytes_out'] / model_bytes(name):.2f}× "
                                             f"({big['bytes_by_kind']['tables'] / 1e3:.0f} kB)")
            print(f"| {name} | W{bits}A8 | {m1:.2f} / {n1:.2f} | {mf:.2f} / {nf:.2f} | "
                  f"{mf - m1:+.2f} / {nf - n1:+.2f} | {halves or '–'} | "
                  f"{fsc['per_step_activations']} of {acts} "
                  f"(≤ {fsc['step_groups']} groups) | {fsc['bytes_out'] / model_bytes(name):.2f}× "
                  f"(S = {fsc['timesteps']}) | {s1000} |",
                  flush=True)


if __name__ == "__main__":
    main()
