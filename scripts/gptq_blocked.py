#!/usr/bin/env python3
"""The quality cost of GPTQ on a block-diagonal H (what layers with K above the block size
get, e.g. Stable Diffusion's convs), measured on the small models by forcing small blocks.

    python3 scripts/gptq_blocked.py [--models a,b] [--blocks exact,256,128,64]
        [--bits 4] [--timesteps ddim:50] [--tfmqc BIN] [--workdir DIR] [--reuse]
        [--out results/gptq_blocked.md] [--json results/gptq_blocked.json]

For every model, weight width and block size it runs

    TFMQC_GPTQ_BLOCK=B tfmqc models/X.onnx -o WORK/X.wW.bB.onnx --timesteps ddim:50
        --weight-bits W --seed 0 --report WORK/X.wW.bB.json

(`exact`: no TFMQC_GPTQ_BLOCK, i.e. the default block of 4096, above every K of these
models; `none`: `--reconstruct none`, round to nearest) and reads the mean and minimum
per-step output SQNR against float from the report. TFMQC_GPTQ_BLOCK is an internal knob
for this measurement only (passes/src/quantize.rs). Only the standard library is needed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Everything from this heading on in the output file is written by hand and kept.
HAND = "## Conclusion and the block size chosen (written by hand)"


def log(msg: str) -> None:
    print(f"[gptq_blocked {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run_one(binary: Path, model: str, bits: int, block: str, args, work: Path) -> dict:
    tag = f"{model}.w{bits}.b{block}"
    out, rep, logfile = work / f"{tag}.onnx", work / f"{tag}.json", work / f"{tag}.log"
    cmd = [str(binary), f"models/{model}.onnx", "-o", str(out), "--timesteps", args.timesteps,
           "--weight-bits", str(bits), "--seed", "0", "--report", str(rep)]
    env = dict(os.environ)
    env.pop("TFMQC_GPTQ_BLOCK", None)
    prefix = []
    if block == "none":
        cmd += ["--reconstruct", "none"]
    elif block != "exact":
        env["TFMQC_GPTQ_BLOCK"] = block
        prefix = [f"TFMQC_GPTQ_BLOCK={block}"]
    shown = shlex.join([*prefix, "tfmqc", *cmd[1:]])
    if args.reuse and rep.exists():
        log(f"reusing {rep}")
    else:
        log(shown)
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        logfile.write_text(f"# wall {time.time() - t0:.1f} s\n$ {shown}\n{r.stderr}")
        if r.returncode != 0:
            tail = "\n".join(r.stderr.strip().splitlines()[-5:])
            log(f"  FAILED (exit {r.returncode}): {tail}")
            return {"command": shown, "error": tail}
    d = json.loads(rep.read_text())
    layers = [l for l in d.get("layers", []) if l.get("output_error_rtn") is not None]
    row = {
        "command": shown,
        "sqnr_mean_db": d["output_sqnr_mean_db"],
        "sqnr_min_db": d["output_sqnr_min_db"],
        "reconstruct_seconds": sum(l.get("reconstruct_seconds") or 0 for l in layers),
        # Under the block-diagonal error when blocked: comparable within a row only.
        "layer_error_ratio": (sum(l["output_error_reconstructed"] for l in layers)
                              / max(sum(l["output_error_rtn"] for l in layers), 1e-30)),
    }
    log(f"  {row['sqnr_mean_db']:.2f} dB mean")
    return row


def write_md(path: Path, meta: dict, res: dict, blocks, bits_list) -> None:
    L = [
        "# GPTQ on a block-diagonal H: quality cost on the small models",
        "",
        f"Made by `{meta['command']}` on {meta['date']} ({meta['machine']}).",
        "",
        "Each cell: `TFMQC_GPTQ_BLOCK=B tfmqc models/X.onnx -o X.q.onnx --timesteps ddim:50 "
        "--weight-bits W --seed 0 --report r.json` (act 8 bits, other options default; "
        "`exact`: without the variable — every K of these models is below the default block "
        "of 4096, so H is exact; `none`: `--reconstruct none`). Per-step output SQNR against "
        "float on the calibration trajectories, mean / min over steps, dB. Blocks are at most "
        "B inputs, boundaries on whole 3×3 patches for convs.",
        "",
    ]
    for bits in bits_list:
        L += [f"## W{bits}A8", "",
              "| model | " + " | ".join(b if b in ("exact", "none") else f"B = {b}" for b in blocks) + " |",
              "| --- |" + " --- |" * len(blocks)]
        for model, per in res.items():
            cells = []
            for b in blocks:
                c = per.get(str(bits), {}).get(b, {})
                cells.append(f"{c['sqnr_mean_db']:.2f} / {c['sqnr_min_db']:.1f}"
                             if "sqnr_mean_db" in c else "failed")
            L.append(f"| {model} | " + " | ".join(cells) + " |")
        L.append("")
    # Keep the hand-written part of an earlier file (from its marker on).
    if path.exists() and HAND in path.read_text():
        L.append(HAND + path.read_text().split(HAND, 1)[1].rstrip("\n"))
    path.write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ddpm_digits,ddim_unet,unet2d_attn")
    ap.add_argument("--blocks", default="none,exact,1024,512,256,128,64")
    ap.add_argument("--bits", default="4")
    ap.add_argument("--timesteps", default="ddim:50")
    ap.add_argument("--tfmqc", default=None, help="binary (default: target/release/tfmqc)")
    ap.add_argument("--workdir", default="/tmp/gptq_blocked")
    ap.add_argument("--reuse", action="store_true")
    ap.add_argument("--out", default="results/gptq_blocked.md")
    ap.add_argument("--json", default="results/gptq_blocked.json")
    args = ap.parse_args()
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    binary = Path(args.tfmqc) if args.tfmqc else target / "release" / "tfmqc"
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    blocks = args.blocks.split(",")
    bits_list = [int(b) for b in args.bits.split(",")]
    res: dict = {}
    for model in args.models.split(","):
        for bits in bits_list:
            for b in blocks:
                res.setdefault(model, {}).setdefault(str(bits), {})[b] = run_one(binary, model, bits, b, args, work)
    meta = {
        "command": shlex.join(["python3", "scripts/gptq_blocked.py", *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
    }
    write_md(ROOT / args.out, meta, res, blocks, bits_list)
    (ROOT / args.json).write_text(json.dumps({"meta": meta, "results": res}, indent=1))
    log(f"wrote {args.out} and {args.json}")


if __name__ == "__main__":
    main()
