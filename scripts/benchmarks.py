#!/usr/bin/env python3
"""Regenerates BENCHMARKS.md: the quality table of every denoiser in models/ and its plots.

    target/pyenv/bin/python scripts/benchmarks.py [--models a,b] [--reuse] [--no-build]

For every denoiser models/X.onnx (each with a models/X.inputs.safetensors, except the
digits_features classifier and the one-conv conv3x3_64) it builds four quantized files into
target/bench/, each model deployed as scripts/compare_quant.py's MODEL_ARGS say (its
scheduler_config.json, class tokens and guidance; the metadata otherwise):

  X.tfmqc.w8.onnx   tfmqc X.onnx --seed 0 [MODEL_ARGS]                   (W8A8; also
                    --dump-calib and --report, which the onnxruntime run reads)
  X.tfmqc.w4.onnx   the same with --weight-bits 4                        (W4A8)
  X.minmax.w8.onnx  the same W8A8 run with --baseline minmax             (plain min-max PTQ)
  X.ort.w8.onnx     onnxruntime quantize_static: QDQ, per-channel QInt8 weights, QUInt8
                    activations, MinMax, calibrated on tfmqc's dump, leaving in float the
                    nodes tfmqc leaves in float and the time-step block it folds (the
                    "same layers" variant of scripts/compare_quant.py, whose helpers it uses)

then runs, per model,

  tfmqc eval models/X.onnx <the four files> --steps 50 --samples M --seed 0 --json
        --plots results/eval/X [MODEL_ARGS] [--fd-features models/digits_features.onnx
        --fd-ref models/digits_features_ref.json  (the trained models only)]

into results/eval/X.json, and writes BENCHMARKS.md from those JSON files. A "## Speed"
section already in BENCHMARKS.md is kept as it is (`tfmqc bench` fills it).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import compare_quant as cq  # noqa: E402  (its onnxruntime helpers)

TRAINED = ("ddpm_digits", "digits_cond")
STEPS = 50
SAMPLES_TRAINED = 64
SAMPLES_OTHER = 4
VARIANTS = [
    ("tfmqc.w8", "tfmqc W8A8"),
    ("tfmqc.w4", "tfmqc W4A8"),
    ("minmax.w8", "min-max W8A8"),
    ("ort.w8", "ORT quantize_static W8A8"),
]


def log(msg: str) -> None:
    print(f"[benchmarks {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(cmd: list[str], log_to: Path | None = None, stdout: Path | None = None) -> None:
    shown = shlex.join(cmd)
    log(f"$ {shown}")
    t0 = time.time()
    with open(stdout, "w") if stdout else open(os.devnull, "w") as out:
        r = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.PIPE, text=True)
    if log_to:
        log_to.write_text(f"$ {shown}\n# exit {r.returncode} after {time.time() - t0:.1f} s\n{r.stderr}")
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        sys.exit(f"benchmarks: `{shown}` failed with exit code {r.returncode}")
    log(f"  {time.time() - t0:.1f} s")


def build_quant_files(name: str, tfmqc: str, work: Path, reuse: bool) -> None:
    model = f"models/{name}.onnx"
    calib = work / f"{name}.calib.safetensors"
    report = work / f"{name}.tfmqc.w8.report.json"
    base = [tfmqc, model, "--seed", "0", *cq.MODEL_ARGS.get(name, [])]
    jobs = [
        ("tfmqc.w8", ["--dump-calib", str(calib), "--report", str(report)]),
        ("tfmqc.w4", ["--weight-bits", "4"]),
        ("minmax.w8", ["--baseline", "minmax"]),
    ]
    for variant, extra in jobs:
        out = work / f"{name}.{variant}.onnx"
        if reuse and out.exists() and (variant != "tfmqc.w8" or calib.exists()):
            log(f"  reusing {out}")
            continue
        run([*base, "-o", str(out), *extra], log_to=work / f"{name}.{variant}.log")

    out = work / f"{name}.ort.w8.onnx"
    if reuse and out.exists():
        log(f"  reusing {out}")
        return
    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    inspect = json.loads(subprocess.run([tfmqc, "inspect", model, "--json"],
                                        cwd=ROOT, capture_output=True, text=True, check=True).stdout)
    float_model = onnx.load(str(ROOT / model), load_external_data=False)
    nodes = {n.name for n in float_model.graph.node}
    inits = {i.name for i in float_model.graph.initializer}
    inputs = [i.name for i in float_model.graph.input if i.name not in inits]
    kept = json.loads(report.read_text()).get("kept_float") or []
    tib = (inspect.get("tib") or {}).get("fold_nodes") or []
    exclude = sorted({n for n in [*kept, *tib] if n in nodes})
    pre = work / f"{name}.ort_pre.onnx"
    log(f"  quantize_static W8A8, {len(exclude)} nodes left in float")
    quant_pre_process(str(ROOT / model), str(pre), skip_optimization=True, skip_symbolic_shape=True)
    cq.rename_colliding_initializers(pre)
    records = cq.load_records(calib)
    cq.conform_records(records, float_model)
    cache = work / f"{name}.ort_calib_cache.json"
    if cache.exists():
        cache.unlink()
    cwd = os.getcwd()
    os.chdir(work)  # onnxruntime's quantizer leaves temporary files in the working directory
    try:
        cq.ort_quantize(pre, out, records, inputs, 8, exclude, cache, SimpleNamespace(threads=2))
    finally:
        os.chdir(cwd)


def eval_command(name: str) -> list[str]:
    """The `tfmqc eval` call of one model (run from the repository root)."""
    samples = SAMPLES_TRAINED if name in TRAINED else SAMPLES_OTHER
    cmd = ["tfmqc", "eval", f"models/{name}.onnx"]
    cmd += [f"target/bench/{name}.{v}.onnx" for v, _ in VARIANTS]
    for _, label in VARIANTS:
        cmd += ["--label", label]
    cmd += ["--steps", str(STEPS), "--samples", str(samples), "--seed", "0", "--json",
            "--plots", f"results/eval/{name}", *cq.MODEL_ARGS.get(name, [])]
    if name in TRAINED:
        cmd += ["--fd-features", "models/digits_features.onnx",
                "--fd-ref", "models/digits_features_ref.json"]
    return cmd


def fmt(v, d=1) -> str:
    return "–" if v is None else f"{v:.{d}f}"


def summary(q: dict, *path):
    cur = q
    for p in path:
        if not isinstance(cur, dict) or cur.get(p) is None:
            return None
        cur = cur[p]
    return cur


def sampler_section() -> list[str]:
    """tfmqc against onnxruntime's quantize_static along the deployment sampler's trajectories,
    from results/quant_compare.json (scripts/compare_quant.py), when it is there."""
    p = ROOT / "results" / "quant_compare.json"
    if not p.exists():
        return []
    data = json.loads(p.read_text())
    meta, models = data["meta"], data["models"]
    L = ["## Along the deployment sampler: tfmqc vs onnxruntime quantize_static, W8A8 and W4A8\n"]
    L.append(f"Made by `{meta['command']}` ({meta['date'][:10]}, {meta['machine']}, "
             f"{meta['seconds'] / 60:.0f} min; full tables and notes: "
             "[results/quant_compare.md](results/quant_compare.md)). Each model is compiled for its "
             "deployment — its scheduler_config.json (SD-1.5's for the SD-like UNets; digits_cond's own, "
             "with its class tokens and classifier-free guidance 3), tfmqc's default time-step set "
             f"and the `{meta.get('sampler', 'ddim')}` sampler — and calibrated on that sampler's "
             "trajectories; onnxruntime's `quantize_static` (QDQ, per-channel weights, uint8 activations, "
             "MinMax) is calibrated on tfmqc's calibration records of the same trajectories. Cells: "
             "per-step output SQNR against float, **mean / min over the time steps**, dB, on held-out "
             "trajectories of the same sampler (`tfmqc --dump-eval`: other seeds, every sampling step "
             "count), onnxruntime with graph optimizations off (the quantization itself).\n")
    cols = [("tfmqc", "tfmqc"), ("ort_same", "ORT (same layers)"), ("ort_default", "ORT (defaults)")]
    for bits in ("w8a8", "w4a8"):
        L.append(f"| model ({bits.upper()}) | " + " | ".join(t for _, t in cols) + " |")
        L.append("| --- |" + " --- |" * len(cols))
        for name, r in models.items():
            cells = []
            for v, _ in cols:
                c = (r.get("bits") or {}).get(bits, {}).get(v, {})
                sim = c.get("sim") or {}
                if "mean_db" in sim:
                    cells.append(f"{sim['mean_db']:.1f} / {sim['min_db']:.1f}")
                else:
                    cells.append(str(c.get("error", "–")).split(":")[0])
            L.append(f"| {name} | " + " | ".join(cells) + " |")
        L.append("")
    return L


def write_markdown(names: list[str], results: dict, command: str, seconds: float) -> None:
    md = ROOT / "BENCHMARKS.md"
    speed = ("## Speed\n\nProduced by `tfmqc bench` (tract float vs the tfmqc runtime's int8 kernels vs "
             "onnxruntime, per step and per sampling loop); the table is filled when that command lands.\n")
    if md.exists():
        old = md.read_text()
        at = old.find("\n## Speed")
        if at >= 0:
            rest = old[at + 1:]
            end = rest.find("\n## ", 3)
            speed = rest if end < 0 else rest[:end + 1]
    L = []
    L.append("# Benchmarks\n")
    L.append("Quality of tfmqc against plain min-max PTQ and onnxruntime's own quantizer on every "
             "denoiser in models/, measured by `tfmqc eval` against the float model on the same seeds "
             "(DESIGN.md §7). Regenerate everything on this page (quantized files, JSON, plots, this "
             "file) with\n")
    L.append("```sh\ncargo build --release\ntarget/pyenv/bin/python scripts/benchmarks.py\n```\n")
    L.append(f"(last run: `{command}`, {seconds / 60:.0f} min on 2 shared cores). Each model's numbers "
             "come from one command, written in its section below; its full JSON (schema: "
             "docs/eval-json.md) and plots are in `results/eval/`.\n")
    L.append("Columns: **TF cos** = cosine similarity of the temporal features (every TIB frontier "
             "value, every t in S), mean / min; **step SQNR** = denoiser output SQNR per "
             "time step on float DDIM-50 trajectories of the model's scheduler (2, or the model's fixed batch; "
             "with guidance for digits_cond), mean / min over the steps, "
             "dB; **sample PSNR** = PSNR of M samples (DDIM 50 steps from the same noise, the "
             "runtime's sampler, int8 kernels for tfmqc files) against the float model's samples, "
             "mean / min, dB; **FD** = Fréchet distance to the training data in the feature space "
             "of models/digits_features.onnx (trained models only; M = "
             f"{SAMPLES_TRAINED} samples, so biased upwards: compare columns, not the value with "
             "models/README.md's 3.48 at M = 1024).\n")
    L.append("Variants: **tfmqc** = `tfmqc MODEL --seed 0` plus the model's deployment (its scheduler "
             "config, class tokens and guidance for digits_cond; S = every step the samplers visit at "
             "20, 25, 30, 50 steps; defaults otherwise: TIB folded "
             "into exact tables, GPTQ rounding, one set of activation scales) at 8 and 4 weight bits; "
             "**min-max** = the same with `--baseline minmax` (TIB quantized like the rest, min/max "
             "ranges, round-to-nearest); **ORT** = onnxruntime `quantize_static` (QDQ, per-channel "
             "int8 weights, uint8 activations, MinMax) calibrated on tfmqc's calibration records, with "
             "the nodes tfmqc keeps in float and the time-step block excluded (so its temporal "
             "features stay float, cosine 1, like tfmqc's exact tables; min-max quantizes the time "
             "block and shows the error the paper's Fig. 4 is about). The untrained models' "
             "samples diverge from the float ones for every variant (random weights amplify any "
             "error over 50 steps): their sample PSNR says little; the step SQNR is the number to read.\n")
    L.append("## Overview: step SQNR mean (dB) / sample PSNR mean (dB)\n")
    labels = [label for _, label in VARIANTS]
    L.append("| model | " + " | ".join(labels) + " |")
    L.append("| --- |" + " --- |" * len(labels))
    for name in names:
        cells = []
        by_label = {q["label"]: q for q in results[name]["quant"]}
        for label in labels:
            q = by_label.get(label)
            if q is None:
                cells.append("–")
                continue
            sq = summary(q, "step_sqnr_db", "summary", "mean")
            ps = summary(q, "sample_psnr_db", "summary", "mean")
            cells.append(f"{fmt(sq)} / {fmt(ps)}")
        L.append(f"| {name} | " + " | ".join(cells) + " |")
    L.append("")
    L.extend(sampler_section())
    for name in names:
        r = results[name]
        L.append(f"## {name}\n")
        L.append(f"`{shlex.join(eval_command(name))}`\n")
        L.append("| model | TF cos mean / min | step SQNR dB mean / min | sample PSNR dB mean / min | FD |")
        L.append("| --- | --- | --- | --- | --- |")
        L.append(f"| float | 1 / 1 | – | – | {fmt(r['float'].get('fd'), 2)} |")
        for q in r["quant"]:
            cos = summary(q, "temporal_features", "summary", "cosine")
            cos_s = f"{cos['mean']:.5f} / {cos['min']:.5f}" if cos else "n/a"
            sq = summary(q, "step_sqnr_db", "summary") or {}
            ps = summary(q, "sample_psnr_db", "summary") or {}
            L.append(f"| {q['label']} | {cos_s} | {fmt(sq.get('mean'))} / {fmt(sq.get('min'))} | "
                     f"{fmt(ps.get('mean'))} / {fmt(ps.get('min'))} | {fmt(q.get('fd'), 2)} |")
        L.append("")
        plots = r.get("plots") or {}
        # tfmqc runs from the repository root: its paths are relative to it.
        rel = lambda p: os.path.relpath(p, ROOT) if os.path.isabs(p) else p  # noqa: E731
        shown = [(k, plots[k]) for k in ("temporal_features_png", "step_sqnr_png", "samples_png") if k in plots]
        for k, p in shown:
            L.append(f"![{name} {k.removesuffix('_png').replace('_', ' ')}]({rel(p)})")
        svgs = [rel(plots[k]) for k in ("temporal_features_svg", "step_sqnr_svg") if k in plots]
        if svgs:
            L.append("\nSVG: " + ", ".join(f"[{Path(s).name}]({s})" for s in svgs))
        for n in r.get("notes") or []:
            # The feature model fits the digits only: saying so per model is noise.
            if n.startswith("Fréchet distance skipped"):
                continue
            L.append(f"\n> {n}")
        L.append("")
    L.append(speed.rstrip() + "\n")
    md.write_text("\n".join(L))
    log(f"wrote {md}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", help="comma-separated names (default: every denoiser in models/)")
    ap.add_argument("--reuse", action="store_true", help="keep quantized files already in target/bench")
    ap.add_argument("--no-build", action="store_true", help="do not run cargo build --release")
    args = ap.parse_args()
    cq.ensure_python_env()
    t0 = time.time()
    if not args.no_build:
        run(["cargo", "build", "--release", "-q"])
    work = ROOT / "target" / "bench"
    work.mkdir(parents=True, exist_ok=True)
    # A private copy: a rebuild during the run cannot swap the binary under it.
    tfmqc = str(work / "tfmqc")
    target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
    shutil.copy2(target / "release" / "tfmqc", tfmqc)
    names = args.models.split(",") if args.models else cq.default_models()
    results = {}
    for name in names:
        log(f"== {name}")
        build_quant_files(name, tfmqc, work, args.reuse)
        out = ROOT / "results" / "eval" / f"{name}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = eval_command(name)
        run([tfmqc, *cmd[1:]], stdout=out, log_to=work / f"{name}.eval.log")
        results[name] = json.loads(out.read_text())
    command = shlex.join(["target/pyenv/bin/python", "scripts/benchmarks.py", *sys.argv[1:]])
    if args.models:
        # A partial run updates only its models' JSON; the page needs all of them.
        for name in cq.default_models():
            p = ROOT / "results" / "eval" / f"{name}.json"
            if name not in results and p.exists():
                results[name] = json.loads(p.read_text())
        names = [n for n in cq.default_models() if n in results]
    write_markdown(names, results, command, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
