#!/usr/bin/env python3
"""The paper's Fig. 4 from a tfmqc report: temporal-feature cosine per t, RTN vs TIAR.

    tfmqc models/ddpm_digits.onnx -o /tmp/q.onnx --timesteps ddim:50 --weight-bits 4 \\
        --tib quant --report /tmp/r.json
    python3 scripts/tiar_fig4.py /tmp/r.json [--command "the tfmqc command"] > results/tiar_fig4.md

Reads the report's `tib` section (written with --tib quant|auto) and prints Markdown: per
frontier value the worst cosine over S and the relative MSE (RTN / TIAR) with its choice
and table bytes, then per t in S the worst cosine over the frontier values (RTN / TIAR).
Standard library only.
"""
import argparse
import json
import sys


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--command", default=None, help="the tfmqc command that wrote the report")
    a = ap.parse_args()
    r = json.load(open(a.report))
    tib = r.get("tib")
    if not tib:
        print(f"{a.report}: no 'tib' section (run tfmqc with --tib quant or auto)", file=sys.stderr)
        return 1
    if tib.get("fallback"):
        print(f"{a.report}: --tib fell back to tables: {tib['fallback']}", file=sys.stderr)
        return 1
    out = ["# TIAR: temporal-feature cosine per time step (the paper's Fig. 4)", ""]
    if a.command:
        out += [f"Made by `{a.command}`, then `python3 scripts/tiar_fig4.py REPORT`.", ""]
    out += [
        f"--tib {tib['mode']}, W{tib['weight_bits']}A{tib['act_bits']}, |S| = {len(tib['timesteps'])}, "
        f"TIAR {tib['iters']} Adam steps in {tib['seconds']:.1f} s. TIAR loss "
        f"{tib['loss_tiar']:.3e} vs round-to-nearest {tib['loss_rtn']:.3e}"
        + (" (RTN kept)" if tib["kept_rtn"] else "") + ". "
        f"Denoiser output SQNR (whole model, same run): mean {r['output_sqnr_mean_db']:.2f} dB, "
        f"worst step {r['output_sqnr_min_db']:.2f} dB.",
        "",
        "| frontier value | choice | table bytes | min cosine RTN | min cosine TIAR | rel. MSE RTN | rel. MSE TIAR |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in tib["frontier"]:
        out.append(
            f"| `{f['value']}` | {f['choice']} | {f['table_bytes']} | {f['cosine_min_rtn']:.5f} | "
            f"{f['cosine_min_tiar']:.5f} | {f['rel_mse_rtn']:.2e} | {f['rel_mse_tiar']:.2e} |"
        )
    out += ["", "Per t in S, worst cosine over the frontier values:", "",
            "| t | RTN | TIAR |", "| --- | --- | --- |"]
    for i, t in enumerate(tib["timesteps"]):
        rtn = min(f["cosine_rtn"][i] for f in tib["frontier"])
        tiar = min(f["cosine_tiar"][i] for f in tib["frontier"])
        out.append(f"| {t} | {rtn:.5f} | {tiar:.5f} |")
    worst_rtn = min(min(f["cosine_rtn"]) for f in tib["frontier"])
    worst_tiar = min(min(f["cosine_tiar"]) for f in tib["frontier"])
    out += ["", f"Worst over all t and frontier values: RTN {worst_rtn:.5f}, TIAR {worst_tiar:.5f}.", ""]
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
