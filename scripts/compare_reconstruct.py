#!/usr/bin/env python3
"""Weight-rounding reconstruction side by side: --reconstruct none | gptq | adaround.

    python3 scripts/compare_reconstruct.py [--models a,b] [--bits 4,8]
        [--methods none,gptq,adaround] [--timesteps ddim:50] [--tfmqc BIN]
        [--out results/reconstruct_compare.md] [--json results/reconstruct_compare.json]
        [--extra ARG ...]

For every denoiser in models/ (models/X.onnx with models/X.inputs.safetensors, except the
digits_features classifier), every weight width (activations at 8 bits) and every method
it runs

    tfmqc models/X.onnx -o WORK/X.wB.METHOD.onnx --timesteps ddim:50 --weight-bits B
          --reconstruct METHOD --seed 0 --report WORK/X.wB.METHOD.json

and reads from the report: the mean and minimum per-step output SQNR against float (on the
calibration trajectories; the same records for every method, since the seed is the same),
the seconds per phase, and the layers' summed output error ||ŴX − WX||² before (RTN) and
after reconstruction. Only the standard library is needed. The wall time of each run is
measured on whatever else the machine is doing: on a shared machine compare phases within
one run, and treat run-to-run differences under ~20 % as noise.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXCLUDED = {"digits_features"}


def log(msg: str) -> None:
    print(f"[compare_reconstruct {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def default_models() -> list[str]:
    return [p.stem for p in sorted((ROOT / "models").glob("*.onnx"))
            if p.stem not in EXCLUDED and (ROOT / "models" / f"{p.stem}.inputs.safetensors").exists()]


def run_one(binary: Path, model: str, bits: int, method: str, args, work: Path) -> dict:
    out = work / f"{model}.w{bits}.{method}.onnx"
    rep = work / f"{model}.w{bits}.{method}.json"
    cmd = [str(binary), f"models/{model}.onnx", "-o", str(out), "--timesteps", args.timesteps,
           "--weight-bits", str(bits), "--reconstruct", method, "--seed", "0", "--report", str(rep),
           *args.extra]
    shown = shlex.join(["tfmqc", *cmd[1:]])
    logfile = work / f"{model}.w{bits}.{method}.log"
    if args.reuse and rep.exists():
        # A finished run of an earlier invocation (same command line, see the log); its
        # wall time from the log, else the sum of its phases.
        head = logfile.read_text() if logfile.exists() else ""
        if head.startswith("# wall"):
            wall = float(head.split()[2])
        else:
            wall = sum(t for _, t in json.loads(rep.read_text())["seconds_per_phase"])
        log(f"reusing {rep}")
        r = subprocess.CompletedProcess(cmd, 0, "", "")
    else:
        log(shown)
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        wall = time.time() - t0
        logfile.write_text(f"# wall {wall:.1f} s\n$ {shown}\n{r.stderr}")
    if r.returncode != 0:
        tail = "\n".join(r.stderr.strip().splitlines()[-5:])
        log(f"  FAILED (exit {r.returncode}): {tail}")
        return {"command": shown, "error": tail, "wall_seconds": round(wall, 1)}
    d = json.loads(rep.read_text())
    layers = d.get("layers", [])
    rtn = sum(l["output_error_rtn"] or 0 for l in layers if l.get("output_error_rtn") is not None)
    rec = sum(l["output_error_reconstructed"] or 0 for l in layers
              if l.get("output_error_reconstructed") is not None)
    row = {
        "command": shown,
        "sqnr_mean_db": d["output_sqnr_mean_db"],
        "sqnr_min_db": d["output_sqnr_min_db"],
        "phases": dict(d["seconds_per_phase"]),
        "wall_seconds": round(wall, 1),
        "layer_error_rtn": rtn,
        "layer_error_reconstructed": rec,
        "reconstruct_seconds": sum(l.get("reconstruct_seconds") or 0 for l in layers),
    }
    log(f"  {row['sqnr_mean_db']:.2f} dB mean, {wall:.1f} s")
    return row


def write_md(path: Path, meta: dict, res: dict, methods, bits_list) -> None:
    L = [
        "# Weight-rounding reconstruction: none (RTN) vs GPTQ vs layer-wise AdaRound",
        "",
        f"Made by `{meta['command']}` on {meta['date']} ({meta['machine']}; total {meta['seconds']:.0f} s).",
        "",
        "Each cell: `tfmqc models/X.onnx --timesteps " + meta["timesteps"] +
        " --weight-bits B --reconstruct M --seed 0` (act 8 bits, other options default). "
        "SQNR = per-step output SQNR vs float on the calibration trajectories (mean / min over "
        "steps, dB). Time = the `quantize` phase (where reconstruction runs) and the whole run, "
        "in seconds, on a shared, noisy 2-core machine (other engineers' builds ran at the same time).",
        "",
    ]
    for b in bits_list:
        L += [f"## W{b}A8", "",
              "| model | " + " | ".join(f"{m} SQNR" for m in methods) + " | " +
              " | ".join(f"{m} quantize s / total s" for m in methods) + " |",
              "| --- " * (1 + 2 * len(methods)) + "|"]
        for model, per_bits in res.items():
            cells = per_bits.get(str(b), {})
            sq, tm = [], []
            for m in methods:
                c = cells.get(m, {})
                if "sqnr_mean_db" in c:
                    sq.append(f"{c['sqnr_mean_db']:.1f} / {c['sqnr_min_db']:.1f}")
                    tm.append(f"{c['phases'].get('quantize', 0):.1f} / {c['wall_seconds']:.1f}")
                else:
                    sq.append("failed" if c else "–")
                    tm.append("–")
            L.append(f"| {model} | " + " | ".join(sq) + " | " + " | ".join(tm) + " |")
        L.append("")
        means = {}
        for m in methods:
            v = [per_bits[str(b)][m]["sqnr_mean_db"] for per_bits in res.values()
                 if "sqnr_mean_db" in per_bits.get(str(b), {}).get(m, {})]
            if v:
                means[m] = sum(v) / len(v)
        L.append("Mean over models: " + ", ".join(f"{m} {v:.2f} dB" for m, v in means.items()) + ".")
        L.append("")
    path.write_text("\n".join(L))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models")
    ap.add_argument("--bits", default="4,8")
    ap.add_argument("--methods", default="none,gptq,adaround")
    ap.add_argument("--timesteps", default="ddim:50")
    ap.add_argument("--tfmqc", help="tfmqc binary (default: target/release/tfmqc, copied first)")
    ap.add_argument("--workdir", default="/tmp/compare_reconstruct")
    ap.add_argument("--out", default="results/reconstruct_compare.md")
    ap.add_argument("--json", default="results/reconstruct_compare.json")
    ap.add_argument("--extra", nargs="*", default=[], help="more tfmqc arguments")
    ap.add_argument("--reuse", action="store_true",
                    help="read the reports of finished runs in --workdir instead of running them again")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    src = Path(args.tfmqc) if args.tfmqc else ROOT / "target" / "release" / "tfmqc"
    binary = work / "tfmqc"
    shutil.copy2(src, binary)  # a rebuild during the run cannot swap the binary under us
    models = args.models.split(",") if args.models else default_models()
    bits_list = [int(b) for b in args.bits.split(",")]
    methods = args.methods.split(",")
    t0 = time.time()
    res: dict = {}
    for model in models:
        for b in bits_list:
            for m in methods:
                res.setdefault(model, {}).setdefault(str(b), {})[m] = run_one(binary, model, b, m, args, work)
    meta = {
        "command": shlex.join(["python3", "scripts/compare_reconstruct.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {__import__('os').cpu_count()} cores",
        "seconds": time.time() - t0,
        "timesteps": args.timesteps,
    }
    Path(args.json).write_text(json.dumps({"meta": meta, "results": res}, indent=1))
    write_md(Path(args.out), meta, res, methods, bits_list)
    log(f"wrote {args.out} and {args.json}")
    return 1 if any("error" in c for pb in res.values() for bm in pb.values() for c in bm.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
