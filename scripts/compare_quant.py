#!/usr/bin/env python3
"""Side-by-side quantization quality: tfmqc vs plain min-max PTQ vs onnxruntime's quantize_static.

    target/pyenv/bin/python scripts/compare_quant.py [--models a,b,...]
        [--out results/quant_compare.md] [--json results/quant_compare.json]

For every denoiser in models/ (each models/X.onnx with a models/X.inputs.safetensors,
except digits_features) and for W8A8 and W4A8 it makes five quantized models:

  tfmqc        tfmqc X.onnx --weight-bits B --seed 0 [the model's deployment: MODEL_ARGS]
               calibrated on trajectories of the deployment sampler (DDIM under the model's
               scheduler: its metadata, SD-1.5's config for the SD-like UNets, the shipped
               scheduler_config.json + class tokens + guidance 3 for digits_cond); the W8
               run also writes its calibration records (--dump-calib) and the held-out
               trajectories its report is measured on (--dump-eval)
  min-max      the same plus --baseline minmax (no TIB folding, one set of scales,
               plain min/max ranges, round-to-nearest weights, the same layers quantized)
  ORT (same)   onnxruntime.quantization.quantize_static on the float model: QDQ,
               per-channel weights (QInt8, or QInt4 for W4), QUInt8 activations, MinMax,
               calibrated on the records of tfmqc's dump, with the nodes tfmqc keeps in
               float (report key `kept_float`, plus the time-step block tfmqc folds into
               exact tables when the report does not list it) excluded
  ORT (defaults) the same with nothing excluded
  ORT (tfmqc's layers only) the same with nodes_to_quantize = the layers tfmqc quantizes
               (report key `layers`): ORT otherwise also quantizes the inputs of Add, Mul,
               Sigmoid, Concat, Softmax, ..., which tfmqc leaves in float

and measures each against the float model on the held-out trajectories of the deployment
sampler (the --dump-eval records: other seeds than calibration's, every sampling step
count): per time step t, SQNR = 10·log10(Σ y² / Σ (y − ŷ)²) over all records at t (first
graph output), then the mean and the minimum over the steps. Twice: with onnxruntime's graph optimizations off
(QDQ runs as an exact float simulation of the quantization) and with the default
optimizations (onnxruntime fuses QDQ into its int8 kernels).

Writes a Markdown report (--out) and the same numbers as JSON (--json); progress goes to
stderr. Exits 1 when a tfmqc run fails (after writing what it has), 2 on other errors.

Python packages: scripts/compare_requirements.txt. When the running Python lacks one of
them the script installs them once into target/compare-venv and re-runs itself there.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import importlib
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from collections import OrderedDict, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REQUIREMENTS = ROOT / "scripts" / "compare_requirements.txt"
VENV = ROOT / "target" / "compare-venv"
NEEDED_MODULES = ("numpy", "onnx", "onnxruntime", "onnxruntime.quantization", "safetensors")
EXCLUDED_MODELS = {"digits_features", "conv3x3_64"}  # a classifier (for the Fréchet distance) and one conv layer: no denoisers
# Stable Diffusion 1.5's scheduler_config.json (the keys that matter).
SD15_SCHEDULER = "tests/data/sd15_scheduler_config.json"  # tfmqc runs from the repository root
# How each model is deployed, as tfmqc options (models not listed: their metadata, DDIM).
MODEL_ARGS = {
    "unet2d_cond": ["--scheduler", SD15_SCHEDULER],
    "unet2d_cond_dynbatch": ["--scheduler", SD15_SCHEDULER],
    "sd_tiny": ["--scheduler", "models/sd_tiny.scheduler_config.json"],
    "digits_cond": ["--scheduler", "models/digits_cond.scheduler_config.json",
                    "--calib", "models/digits_cond.calib.safetensors", "--guidance-scale", "3"],
}
BITS = (8, 4)
VARIANTS = ("tfmqc", "minmax", "ort_same", "ort_default", "ort_layers")
VARIANT_TITLES = {
    "tfmqc": "tfmqc",
    "minmax": "min-max baseline",
    "ort_same": "ORT quantize_static (same layers)",
    "ort_default": "ORT quantize_static (defaults)",
    "ort_layers": "ORT quantize_static (tfmqc's layers only)",
}
MODES = ("sim", "kernel")
REEXEC_ENV = "TFMQC_COMPARE_REEXEC"
CMD_ENV = "TFMQC_COMPARE_COMMAND"


def log(msg: str) -> None:
    print(f"[compare_quant {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def die(msg: str, code: int = 2) -> None:
    print(f"compare_quant: error: {msg}", file=sys.stderr, flush=True)
    sys.exit(code)


# --------------------------------------------------------------------------- environment

def ensure_python_env() -> None:
    """Use this Python when it has every package; else install them into target/compare-venv
    (once, recorded by a stamp holding the requirements' hash) and re-run the script there."""
    missing = []
    for mod in NEEDED_MODULES:
        try:
            importlib.import_module(mod)
        except Exception:  # ImportError, or a broken install
            missing.append(mod)
    if not missing:
        return
    if os.environ.get(REEXEC_ENV):
        die(f"{VENV} still lacks {', '.join(missing)} after installing {REQUIREMENTS}")
    digest = hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:16]
    stamp = VENV / f".installed-{digest}"
    py = VENV / "bin" / "python"
    if not stamp.exists():
        log(f"{sys.executable} lacks {', '.join(missing)}: installing {REQUIREMENTS.relative_to(ROOT)} "
            f"into {VENV.relative_to(ROOT)} (once)")
        shutil.rmtree(VENV, ignore_errors=True)
        base = sys.executable
        # a venv's python can make venvs too; fall back on python3 on PATH
        r = subprocess.run([base, "-m", "venv", str(VENV)])
        if r.returncode != 0:
            r = subprocess.run(["python3", "-m", "venv", str(VENV)])
            if r.returncode != 0:
                die(f"could not create the virtual environment {VENV}")
        r = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                            "-r", str(REQUIREMENTS)])
        if r.returncode != 0:
            die(f"pip could not install {REQUIREMENTS} into {VENV}")
        stamp.touch()
    os.environ[REEXEC_ENV] = "1"
    os.environ.setdefault(CMD_ENV, invoked_command())
    os.execv(str(py), [str(py), str(Path(__file__).resolve()), *sys.argv[1:]])


def invoked_command() -> str:
    if os.environ.get(CMD_ENV):
        return os.environ[CMD_ENV]

    def rel(p: str) -> str:
        try:
            return str(Path(p).absolute().relative_to(ROOT))
        except ValueError:
            return p

    return shlex.join([rel(sys.executable), rel(sys.argv[0]), *sys.argv[1:]])


# --------------------------------------------------------------------------- arguments

def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Per-step output SQNR of tfmqc, a min-max baseline and onnxruntime's "
                    "quantize_static against the float model, side by side.")
    ap.add_argument("--models", help="comma-separated model names (models/NAME.onnx); default: every "
                                     "denoiser with a NAME.inputs.safetensors, except digits_features")
    ap.add_argument("--out", default="results/quant_compare.md", help="Markdown report (default: %(default)s)")
    ap.add_argument("--json", default="results/quant_compare.json", help="JSON report (default: %(default)s)")
    ap.add_argument("--workdir", default="/tmp/cq", help="quantized models, dumps, reports, logs (default: %(default)s)")
    ap.add_argument("--timesteps", help="tfmqc --timesteps (default: tfmqc's, every step the samplers "
                                         "visit at 20, 25, 30 and 50 steps)")
    ap.add_argument("--sampler", default="ddim", help="tfmqc --sampler (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="tfmqc --seed (default: %(default)s)")
    ap.add_argument("--bits", default="8,4", help="weight bit widths (default: %(default)s)")
    ap.add_argument("--tfmqc", help="tfmqc binary (default: target/release/tfmqc, built once with cargo)")
    ap.add_argument("--no-build", action="store_true",
                    help="do not run `cargo build --release -q` first; use the binary as it is")
    ap.add_argument("--tfmqc-arg", action="append", default=[],
                    help="extra argument passed to every tfmqc run (repeatable)")
    ap.add_argument("--eval-per-step", type=int, default=0,
                    help="evaluate on at most this many records per time step (0 = all, the default)")
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (default: %(default)s)")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse quantized models, dumps and reports already in --workdir")
    ap.add_argument("--fail-fast", action="store_true", help="stop at the first tfmqc failure")
    ap.add_argument("--no-tfmqc", metavar="CALIB_DIR",
                    help="testing: skip every tfmqc run and read the calibration records from "
                         "CALIB_DIR/NAME.calib.safetensors (kept_float from --workdir/NAME.report.json if any)")
    return ap.parse_args(argv)


# --------------------------------------------------------------------------- helpers

def fmt_db(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, str):
        return v
    return f"{v:.1f}"


def jsonable(v):
    if isinstance(v, float) and (v != v or v in (float("inf"), float("-inf"))):
        return "inf" if v > 0 else ("-inf" if v < 0 else "nan")
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    return v


def file_bytes(path: Path) -> int | None:
    """Size of an ONNX file plus its external-data files (when it has any)."""
    if not path.exists():
        return None
    import onnx
    total = path.stat().st_size
    try:
        m = onnx.load(str(path), load_external_data=False)
        locs = set()
        for init in m.graph.initializer:
            if init.data_location == onnx.TensorProto.EXTERNAL:
                for e in init.external_data:
                    if e.key == "location":
                        locs.add(e.value)
        for loc in locs:
            p = path.parent / loc
            if p.exists():
                total += p.stat().st_size
    except Exception:
        pass
    return total


def default_models() -> list[str]:
    names = []
    for p in sorted((ROOT / "models").glob("*.onnx")):
        name = p.stem
        if name in EXCLUDED_MODELS:
            continue
        if (ROOT / "models" / f"{name}.inputs.safetensors").exists():
            names.append(name)
    return names


class TfmqcFailed(Exception):
    pass


# --------------------------------------------------------------------------- tfmqc

class Tfmqc:
    REQUIRED_FLAGS = ("--weight-bits", "--baseline", "--dump-calib", "--dump-eval", "--scheduler", "--report")

    def __init__(self, args, workdir: Path, inspect_only: bool = False):
        self.args = args
        target = Path(os.environ.get("CARGO_TARGET_DIR") or ROOT / "target")
        src = Path(args.tfmqc) if args.tfmqc else target / "release" / "tfmqc"
        if not args.tfmqc and not args.no_build and not inspect_only:
            log("cargo build --release -q")
            r = subprocess.run(["cargo", "build", "--release", "-q"], cwd=ROOT)
            if r.returncode != 0:
                die("`cargo build --release -q` failed", 1)
        if not src.exists():
            die(f"no tfmqc binary at {src} (build it with `cargo build --release`)", 1)
        # A private copy: a rebuild during the run cannot swap the binary under us.
        self.bin = workdir / "tfmqc"
        shutil.copy2(src, self.bin)
        helptext = self.run_plain(["--help"])
        missing = [f for f in self.REQUIRED_FLAGS if f not in helptext]
        if missing and not inspect_only:
            die(f"{src} does not know {', '.join(missing)} yet (`tfmqc --help` does not list them)", 1)
        self.version = self.run_plain(["--version"]).strip()
        self.source = src
        self.sha256 = hashlib.sha256(self.bin.read_bytes()).hexdigest()[:16]
        self.mtime = _dt.datetime.fromtimestamp(src.stat().st_mtime).astimezone().isoformat(timespec="seconds")

    def run_plain(self, argv) -> str:
        r = subprocess.run([str(self.bin), *argv], cwd=ROOT, capture_output=True, text=True)
        return r.stdout + r.stderr

    def inspect(self, model: Path) -> dict | None:
        ts = ["--timesteps", self.args.timesteps] if self.args.timesteps else []
        r = subprocess.run([str(self.bin), "inspect", str(model), "--json", *ts],
                           cwd=ROOT, capture_output=True, text=True)
        if r.returncode != 0:
            return None
        try:
            return json.loads(r.stdout)
        except json.JSONDecodeError:
            return None

    def quantize(self, model: Path, out: Path, bits: int, baseline: bool, report: Path,
                 dump: Path | None, logfile: Path, dump_eval: Path | None = None) -> dict:
        cmd = [str(self.bin), str(model.relative_to(ROOT)), "-o", str(out),
               "--weight-bits", str(bits), "--sampler", self.args.sampler,
               "--seed", str(self.args.seed), "--report", str(report)]
        if self.args.timesteps:
            cmd += ["--timesteps", self.args.timesteps]
        cmd += MODEL_ARGS.get(model.stem, [])
        if dump is not None:
            cmd += ["--dump-calib", str(dump)]
        if dump_eval is not None:
            cmd += ["--dump-eval", str(dump_eval)]
        if baseline:
            cmd += ["--baseline", "minmax"]
        cmd += self.args.tfmqc_arg
        shown = shlex.join(["tfmqc", *cmd[1:]])
        log(f"  {shown}")
        t0 = time.time()
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        dt = time.time() - t0
        logfile.write_text(f"$ {shown}\n# exit {r.returncode} after {dt:.1f} s\n--- stdout\n{r.stdout}\n--- stderr\n{r.stderr}")
        if r.returncode != 0 or not out.exists():
            tail = "\n".join((r.stderr or r.stdout).strip().splitlines()[-15:])
            raise TfmqcFailed(f"`{shown}` failed with exit code {r.returncode} after {dt:.0f} s "
                              f"(full log: {logfile}):\n{tail}")
        log(f"    done in {dt:.1f} s")
        return {"command": shown, "seconds": round(dt, 2)}


# --------------------------------------------------------------------------- records

def load_records(path: Path) -> list[dict]:
    """The dump: one tensor per graph input and model call, keyed "{i:05d}/{input_name}"."""
    from safetensors.numpy import load_file
    flat = load_file(str(path))
    recs: dict[str, dict] = defaultdict(dict)
    for key, arr in flat.items():
        idx, sep, name = key.partition("/")
        if not sep:
            raise ValueError(f"{path}: key {key!r} is not of the form NNNNN/input_name")
        recs[idx][name] = arr
    order = sorted(recs, key=lambda s: (0, int(s)) if s.isdigit() else (1, s))
    return [recs[k] for k in order]


def step_value(v) -> float | int:
    f = float(v)
    return int(f) if f.is_integer() else f


def record_steps(rec: dict, tin: str, batch: int | None) -> list:
    """The time step of every batch element of a record (one value when t is a scalar)."""
    import numpy as np
    t = np.asarray(rec[tin]).ravel()
    if batch is not None and t.size == batch:
        return [step_value(v) for v in t]
    return [step_value(t[0])] * (batch or 1)


def conform_records(records: list[dict], model) -> int:
    """A one-element tensor whose rank differs from the declared one (t as [1] for a scalar
    input, or the reverse) is reshaped; anything else is left for onnxruntime to reject."""
    ranks = {i.name: len(i.type.tensor_type.shape.dim) for i in model.graph.input
             if i.type.tensor_type.HasField("shape")}
    n = 0
    for rec in records:
        for name, arr in rec.items():
            r = ranks.get(name)
            if r is not None and arr.ndim != r and arr.size == 1 and r <= 1:
                rec[name] = arr.reshape((1,) * r)
                n += 1
    return n


def guess_timestep_input(names: list[str]) -> str | None:
    for n in names:
        if n.lower() in ("t", "timestep", "timesteps", "time", "time_step", "t_in"):
            return n
    for n in names:
        if "time" in n.lower():
            return n
    return None


# --------------------------------------------------------------------------- onnxruntime

def ort_session(path: Path, mode: str, threads: int, optimized_path: Path | None = None):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if mode == "sim"
                                   else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def run_all(sess, records: list[dict]) -> list:
    names = [i.name for i in sess.get_inputs()]
    out_name = sess.get_outputs()[0].name
    outs = []
    for rec in records:
        missing = [n for n in names if n not in rec]
        if missing:
            raise RuntimeError(f"the model wants inputs {missing} that the calibration records lack")
        outs.append(sess.run([out_name], {n: rec[n] for n in names})[0])
    return outs


INT8_KERNEL_OPS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat",
                   "DynamicQuantizeMatMul", "QGemm", "QAttention", "QLinearAdd", "QLinearMul",
                   "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearGlobalAveragePool",
                   "QLinearAveragePool", "QLinearSoftmax", "QLinearWhere", "MatMulNBits", "QLinearReduceMean"}


def kernel_op_counts(opt_path: Path) -> dict | None:
    import onnx
    try:
        m = onnx.load(str(opt_path), load_external_data=False)
    except Exception:
        return None
    counts: dict[str, int] = defaultdict(int)
    for n in m.graph.node:
        counts[n.op_type] += 1
    int8 = {k: v for k, v in counts.items() if k in INT8_KERNEL_OPS}
    return {
        "int8_ops": sum(int8.values()),
        "int8_by_type": dict(sorted(int8.items())),
        "float_conv_matmul_gemm": sum(counts.get(k, 0) for k in ("Conv", "FusedConv", "NchwcConv", "MatMul",
                                                                  "FusedMatMul", "Gemm", "FusedGemm")),
        "dequantize_linear": counts.get("DequantizeLinear", 0),
        "quantize_linear": counts.get("QuantizeLinear", 0),
    }


def sqnr_per_step(ref: list, got: list, steps: list[list]) -> dict:
    import numpy as np
    sig: dict = defaultdict(float)
    err: dict = defaultdict(float)
    for y, yq, st in zip(ref, got, steps):
        y = np.asarray(y, dtype=np.float64)
        yq = np.asarray(yq, dtype=np.float64)
        if y.shape != yq.shape:
            raise RuntimeError(f"output shape {yq.shape} differs from the float model's {y.shape}")
        if len(st) > 1 and y.ndim >= 1 and y.shape[0] == len(st):
            for b, t in enumerate(st):
                sig[t] += float(np.sum(y[b] ** 2))
                err[t] += float(np.sum((y[b] - yq[b]) ** 2))
        else:
            sig[st[0]] += float(np.sum(y ** 2))
            err[st[0]] += float(np.sum((y - yq) ** 2))
    per = OrderedDict()
    for t in sorted(sig):
        if not np.isfinite(err[t]):
            per[t] = float("-inf")
        elif err[t] == 0.0:
            per[t] = float("inf")
        else:
            per[t] = 10.0 * np.log10(sig[t] / err[t]) if sig[t] > 0 else float("-inf")
    vals = list(per.values())
    return {
        "mean_db": float(np.mean(vals)) if vals else None,
        "min_db": float(np.min(vals)) if vals else None,
        "min_at_t": min(per, key=per.get) if vals else None,
        "per_step_db": {str(k): round(v, 3) if np.isfinite(v) else v for k, v in per.items()},
    }


class RecordReader:
    """onnxruntime CalibrationDataReader over the dump's records."""

    def __init__(self, records: list[dict], input_names: list[str]):
        self.records = records
        self.names = input_names
        self.i = 0
        self.end = len(records)

    def get_next(self):
        if self.i >= self.end:
            return None
        rec = self.records[self.i]
        self.i += 1
        return {n: rec[n] for n in self.names}

    def __len__(self):
        return len(self.records)

    def set_range(self, start_index: int, end_index: int):
        self.i, self.end = start_index, min(end_index, len(self.records))

    def rewind(self):
        self.i, self.end = 0, len(self.records)


def ort_quantize(pre: Path, out: Path, records: list[dict], input_names: list[str], bits: int,
                 exclude: list[str], cache: Path, args, include: list[str] | None = None) -> dict:
    """quantize_static as the brief says; W4: QInt4 per-channel, else QInt4 per-tensor."""
    from onnxruntime.quantization import QuantType
    attempts = [(QuantType.QInt8, True)] if bits == 8 else [(QuantType.QInt4, True), (QuantType.QInt4, False)]
    failures = []
    extra_excluded: list[str] = []
    for wtype, per_channel in attempts:
        label = f"{wtype.name} {'per-channel' if per_channel else 'per-tensor'}"
        try:
            try:
                return _ort_quantize_once(pre, out, records, input_names, wtype, per_channel,
                                          list(exclude) + extra_excluded, cache, args, failures, extra_excluded,
                                          include)
            except ValueError as e:
                if "shared mode is not supported for weight" not in str(e) or extra_excluded:
                    raise
                # ORT gives a Gather/Transpose/... of a float initializer (e.g. a class-label
                # embedding table) its input's quantization parameters, which it cannot do for
                # weights. Leave those nodes in float and try again.
                extra_excluded.extend(n for n in shared_param_weight_nodes(pre) if n not in exclude)
                log(f"    quantize_static: {e}; retrying with {extra_excluded} left in float")
                return _ort_quantize_once(pre, out, records, input_names, wtype, per_channel,
                                          list(exclude) + extra_excluded, cache, args, failures, extra_excluded,
                                          include)
        except Exception as e:  # noqa: BLE001 - any failure of ORT's quantizer is a result
            msg = f"{label}: {type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
            log(f"    quantize_static {msg}")
            failures.append(msg)
    raise RuntimeError("; ".join(failures))


def rename_colliding_initializers(path: Path) -> int:
    """Work around onnxruntime's QDQQuantizer._dup_initializer: a bias initializer X shared by
    several nodes is copied as X<n> (n = largest numeric suffix among initializers + 1) without
    checking node outputs, so `val_24` becomes `val_242`, an existing activation. Rename every
    initializer that is a prefix-plus-digits of another value name. Node names do not change."""
    import re
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    values = {o for n in g.node for o in n.output} | {i.name for i in g.input} | {i.name for i in g.initializer}
    rename = {}
    for init in g.initializer:
        pat = re.compile(re.escape(init.name) + r"\d+$")
        if any(pat.match(v) for v in values if v != init.name):
            new = init.name + "_w"
            while new in values:
                new += "_"
            rename[init.name] = new
    if not rename:
        return 0
    for init in g.initializer:
        if init.name in rename:
            init.name = rename[init.name]
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in rename:
                n.input[k] = rename[i]
    for vi in list(g.value_info) + list(g.input):
        if vi.name in rename:
            vi.name = rename[vi.name]
    onnx.save(m, str(path))
    return len(rename)


SHARED_PARAM_OPS = {"Gather", "GatherElements", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten",
                    "Concat", "Split", "Slice", "Resize", "MaxPool", "Expand", "Tile", "Pad"}


def shared_param_weight_nodes(model_path: Path) -> list[str]:
    import onnx
    m = onnx.load(str(model_path), load_external_data=False)
    floats = {i.name for i in m.graph.initializer
              if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)}
    out = []
    for n in m.graph.node:
        if n.op_type in SHARED_PARAM_OPS:
            data_inputs = n.input if n.op_type == "Concat" else n.input[:1]
            if any(i in floats for i in data_inputs):
                out.append(n.name)
    return out


def _ort_quantize_once(pre, out, records, input_names, wtype, per_channel, exclude, cache, args,
                       failures, extra_excluded, include=None) -> dict:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    if out.exists():
        out.unlink()
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)  # quantize_static warns once per non-initializer bias
    try:
        quantize_static(
            str(pre), str(out), RecordReader(records, input_names),
            quant_format=QuantFormat.QDQ, per_channel=per_channel,
            activation_type=QuantType.QUInt8, weight_type=wtype,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=list(exclude) or None,
            nodes_to_quantize=list(include) if include else None,
            # No CalibMaxIntermediateOutputs: in onnxruntime 1.31 MinMaxCalibrater drops every
            # full chunk without merging it (only the last partial chunk counts). Memory is no
            # issue anyway: the augmented model outputs one ReduceMin/ReduceMax per tensor.
            calibration_cache_path=str(cache),
        )
    finally:
        root.setLevel(old)
    ort_session(out, "sim", args.threads)  # it must load
    info = {"weight_type": wtype.name, "per_channel": per_channel, "failed_attempts": failures,
            "also_excluded": list(extra_excluded)}
    info.update(describe_ort_model(out))
    return info


def quantize_own(model: Path, calib: Path, out: Path, workdir: Path, threads: int = 1) -> dict:
    """The "ORT (defaults)" variant for `tfmqc bench --engines ...,ort-int8-own`: onnxruntime's
    own quantize_static on the float MODEL, calibrated on tfmqc's records (CALIB, a --dump-calib
    file), QDQ, per-channel QInt8 weights, QUInt8 activations, MinMax, nothing excluded: the
    int8 file a user of onnxruntime makes first. Temporary files go to WORKDIR."""
    import onnx
    from types import SimpleNamespace
    from onnxruntime.quantization.shape_inference import quant_pre_process
    model, calib, out, workdir = Path(model), Path(calib), Path(out), Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    pre = workdir / f"{out.stem}.ort_pre.onnx"
    quant_pre_process(str(model), str(pre), skip_optimization=True, skip_symbolic_shape=True)
    rename_colliding_initializers(pre)
    float_model = onnx.load(str(model), load_external_data=False)
    inits = {i.name for i in float_model.graph.initializer}
    inputs = [i.name for i in float_model.graph.input if i.name not in inits]
    records = load_records(calib)
    if not records:
        raise RuntimeError(f"{calib} holds no records")
    conform_records(records, float_model)
    cache = workdir / f"{out.stem}.ort_calib_cache.json"
    if cache.exists():
        cache.unlink()
    cwd = os.getcwd()
    os.chdir(workdir)  # onnxruntime's quantizer leaves temporary files in the working directory
    try:
        info = ort_quantize(pre, out, records, inputs, 8, [], cache, SimpleNamespace(threads=threads))
    finally:
        os.chdir(cwd)
    info["records"] = len(records)
    return info


def describe_ort_model(path: Path) -> dict:
    import onnx
    m = onnx.load(str(path), load_external_data=False)
    opsets = {(o.domain or "ai.onnx"): o.version for o in m.opset_import}
    dq_domains = sorted({n.domain or "ai.onnx" for n in m.graph.node if n.op_type == "DequantizeLinear"})
    wtypes: dict[str, int] = defaultdict(int)
    for init in m.graph.initializer:
        if init.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.INT8):
            wtypes[onnx.TensorProto.DataType.Name(init.data_type)] += 1
    return {"opsets": opsets, "dequantize_domains": dq_domains, "low_bit_initializers": dict(wtypes)}


# --------------------------------------------------------------------------- one model

def compare_model(name: str, args, tf: Tfmqc | None, workdir: Path, bits_list, failures: list) -> dict:
    import numpy as np
    import onnx

    model = ROOT / "models" / f"{name}.onnx"
    if not model.exists():
        die(f"no model {model}")
    res: dict = {"model": f"models/{name}.onnx", "float_bytes": file_bytes(model), "bits": {}, "notes": []}
    paths = {b: {v: workdir / f"{name}.{v}.w{b}.onnx" for v in VARIANTS} for b in bits_list}
    calib = workdir / f"{name}.calib.safetensors"
    evalf = workdir / f"{name}.eval.safetensors"
    report_path = workdir / f"{name}.report.json"
    res["tfmqc_runs"] = {}

    float_model = onnx.load(str(model), load_external_data=False)
    node_names = {n.name for n in float_model.graph.node}
    input_names = [i.name for i in float_model.graph.input
                   if i.name not in {x.name for x in float_model.graph.initializer}]

    # ---- tfmqc and the min-max baseline (the first run also dumps the calibration records)
    inspect = (tf or args.inspector).inspect(model) if (tf or args.inspector) else None
    tfmqc_ok = {b: {"tfmqc": tf is not None, "minmax": tf is not None} for b in bits_list}
    if tf is not None:
        first = True
        for b in bits_list:
            for v in ("tfmqc", "minmax"):
                out = paths[b][v]
                rep = report_path if (v == "tfmqc" and first) else workdir / f"{name}.{v}.w{b}.report.json"
                if args.reuse and out.exists() and rep.exists() and (not first or (calib.exists() and evalf.exists())):
                    log(f"  reusing {out}")
                    res["tfmqc_runs"][f"{v}.w{b}"] = {"reused": True}
                else:
                    try:
                        res["tfmqc_runs"][f"{v}.w{b}"] = tf.quantize(
                            model, out, b, v == "minmax", rep, calib if first else None,
                            workdir / f"{name}.{v}.w{b}.log", evalf if first else None)
                    except TfmqcFailed as e:
                        log(str(e))
                        failures.append(f"{name} {v} W{b}A8: {e}")
                        if args.fail_fast:
                            raise
                        tfmqc_ok[b][v] = False
                        res["tfmqc_runs"][f"{v}.w{b}"] = {"error": str(e)}
                        if first:
                            res["error"] = "the tfmqc run that writes the calibration dump failed"
                            return res
                first = False
        calib_path, eval_path = calib, evalf
    else:
        calib_path = Path(args.no_tfmqc) / f"{name}.calib.safetensors"
        eval_path = Path(args.no_tfmqc) / f"{name}.eval.safetensors"
        if not eval_path.exists():
            eval_path = calib_path
        res["notes"].append(f"testing run: tfmqc was not run; records from {calib_path} and {eval_path}")

    # ---- the calibration records
    records = load_records(calib_path)
    if not records:
        die(f"{calib_path} holds no records")
    missing = [n for n in input_names if n not in records[0]]
    if missing:
        die(f"{calib_path}: the records lack the model inputs {missing}")
    conformed = conform_records(records, float_model)
    if conformed:
        res["notes"].append(f"reshaped {conformed} record tensors of one element to the rank the model "
                            "declares (e.g. [1] to a scalar)")
    tin = None
    if inspect and isinstance(inspect.get("tib"), dict):
        tin = inspect["tib"].get("timestep_input")
    tin = tin or guess_timestep_input(input_names)
    if tin is None or tin not in records[0]:
        die(f"{name}: cannot tell which input is the time step")
    res["timestep_input"] = tin
    res["calib_file"] = str(calib_path)
    res["calib_records"] = len(records)
    res["calib_record_shapes"] = {k: [str(v.dtype), list(v.shape)] for k, v in records[0].items()}

    # records for the evaluation (held-out trajectories): all, or at most N per time step
    held_out = load_records(eval_path)
    conform_records(held_out, float_model)
    res["eval_file"] = str(eval_path)
    by_step: dict = defaultdict(list)
    for rec in held_out:
        by_step[record_steps(rec, tin, None)[0]].append(rec)
    eval_records = []
    for t in sorted(by_step):
        group = by_step[t]
        eval_records.extend(group if args.eval_per_step <= 0 else group[: args.eval_per_step])
    res["steps"] = len(by_step)
    res["eval_records"] = len(eval_records)
    log(f"  {len(records)} calibration records; evaluating on {len(eval_records)} held-out records, "
        f"{len(by_step)} time steps (input {tin!r})")

    # ---- which nodes stay float in tfmqc's output
    kept, tib_added, unknown = [], [], []
    report = None
    if report_path.exists():
        try:
            report = json.loads(report_path.read_text())
        except json.JSONDecodeError as e:
            res["notes"].append(f"cannot read {report_path}: {e}")
    if report is not None:
        kept = list(report.get("kept_float") or [])
        if "kept_float" not in report:
            res["notes"].append(f"{report_path.name} has no `kept_float`")
    fold_nodes = []
    if inspect and isinstance(inspect.get("tib"), dict):
        fold_nodes = list(inspect["tib"].get("fold_nodes") or [])
    exclude = [n for n in kept if n in node_names]
    unknown = [n for n in kept if n not in node_names]
    # tfmqc computes the time-step block exactly (tables); ORT must not quantize it either
    for n in fold_nodes:
        if n in node_names and n not in exclude:
            exclude.append(n)
            tib_added.append(n)
    res["excluded_nodes"] = {"kept_float": kept, "added_tib_nodes": tib_added,
                             "kept_float_not_in_float_model": unknown, "count": len(exclude)}
    if unknown:
        res["notes"].append(f"{len(unknown)} `kept_float` names are not node names of the float model "
                            f"(e.g. {unknown[:3]}): ORT cannot exclude them")

    # ---- onnxruntime quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process
    pre = workdir / f"{name}.ort_pre.onnx"
    cache = workdir / f"{name}.ort_calib_cache.json"
    if not (args.reuse and pre.exists()):
        log("  quant_pre_process (ONNX shape inference only: graph optimization would rename nodes)")
        quant_pre_process(str(model), str(pre), skip_optimization=True, skip_symbolic_shape=True)
        renamed = rename_colliding_initializers(pre)
        if renamed:
            res["notes"].append(
                f"renamed {renamed} initializers for ORT's quantizer (it copies an initializer shared by "
                "several biases as NAME+digits without checking other value names; `val_24` → `val_242` "
                "clashed with an activation of the dynamo export)")
    if cache.exists() and not args.reuse:
        cache.unlink()
    ort_info = {}
    layers = [l.get("node") for l in (report or {}).get("layers") or [] if isinstance(l, dict)]
    layers = [n for n in layers if n in node_names]
    res["tfmqc_layers"] = layers
    for b in bits_list:
        for v, excl, incl in (("ort_same", exclude, None), ("ort_default", [], None), ("ort_layers", [], layers)):
            out = paths[b][v]
            if v == "ort_layers" and not layers:
                ort_info[(b, v)] = {"error": "no `layers` in tfmqc's report"}
                continue
            if args.reuse and out.exists():
                log(f"  reusing {out}")
                ort_info[(b, v)] = {"reused": True, **describe_ort_model(out)}
                continue
            what = (f"only tfmqc's {len(incl)} layers" if incl else
                    f"excluding {len(excl)} nodes" if excl else "defaults")
            log(f"  quantize_static W{b}A8 {what}")
            t0 = time.time()
            try:
                ort_info[(b, v)] = ort_quantize(pre, out, records, input_names, b, excl, cache, args, incl)
                ort_info[(b, v)]["seconds"] = round(time.time() - t0, 2)
            except Exception as e:  # noqa: BLE001
                ort_info[(b, v)] = {"error": str(e)}
                if out.exists():
                    out.unlink()

    # ---- evaluation
    for b in bits_list:
        res["bits"][f"w{b}a8"] = {v: {"file": str(paths[b][v]), "bytes": None} for v in VARIANTS}
    for mode in MODES:
        log(f"  evaluating ({'ORT_DISABLE_ALL: exact QDQ simulation' if mode == 'sim' else 'default optimizations: ORT int8 kernels'})")
        fsess = ort_session(model, mode, args.threads)
        ref = run_all(fsess, eval_records)
        del fsess
        steps = [record_steps(rec, tin, np.asarray(y).shape[0] if np.asarray(y).ndim else None)
                 for rec, y in zip(eval_records, ref)]
        for b in bits_list:
            for v in VARIANTS:
                cell = res["bits"][f"w{b}a8"][v]
                path = paths[b][v]
                if v in ("tfmqc", "minmax") and not tfmqc_ok[b][v]:
                    cell["error"] = "tfmqc failed" if tf is not None else "not run"
                    continue
                if v.startswith("ort") and "error" in ort_info.get((b, v), {}):
                    err = ort_info[(b, v)]["error"]
                    cell["error"] = err if err.startswith("no `layers`") else "quantize_static failed: " + err
                    continue
                if v.startswith("ort"):
                    cell["ort"] = ort_info[(b, v)]
                cell["bytes"] = file_bytes(path)
                opt = workdir / f"{name}.{v}.w{b}.ort_optimized.onnx" if mode == "kernel" else None
                try:
                    sess = ort_session(path, mode, args.threads, opt)
                    got = run_all(sess, eval_records)
                    del sess
                    cell[mode] = sqnr_per_step(ref, got, steps)
                    if opt is not None:
                        cell["kernel_ops"] = kernel_op_counts(opt)
                except Exception as e:  # noqa: BLE001
                    cell[mode] = {"error": f"{type(e).__name__}: {str(e).strip()[:400]}"}
                s = cell.get(mode, {})
                log(f"    W{b}A8 {v:12s} {mode:6s} "
                    + (f"{fmt_db(s.get('mean_db'))} / {fmt_db(s.get('min_db'))} dB" if "mean_db" in s
                       else s.get("error", "")))
    return res


# --------------------------------------------------------------------------- output

def cell_text(cell: dict, mode: str) -> str:
    if "error" in cell:
        return cell["error"].split(":")[0]
    s = cell.get(mode)
    if not s:
        return "–"
    if "error" in s:
        return "failed to run"
    return f"{fmt_db(s['mean_db'])} / {fmt_db(s['min_db'])}"


SHORT_TITLES = {
    "tfmqc": "tfmqc",
    "minmax": "min-max baseline",
    "ort_same": "ORT (same layers)",
    "ort_default": "ORT (defaults)",
    "ort_layers": "ORT (tfmqc's layers only)",
}


def write_markdown(path: Path, meta: dict, results: dict, bits_list) -> None:
    L = []
    L.append("# Quantization quality: tfmqc vs min-max PTQ vs onnxruntime quantize_static")
    L.append("")
    L.append(f"Made by `{meta['command']}` on {meta['date']} "
             f"({meta['machine']}; {meta['tfmqc_version']}; onnxruntime {meta['onnxruntime']}; "
             f"{meta['seconds']:.0f} s).")
    L.append("")
    L.append("Cells: per-time-step output SQNR against the float model, "
             "10·log10(Σy² / Σ(y−ŷ)²) over all evaluated records at that step (first graph output), "
             "as **mean over the steps / minimum over the steps**, in dB. Evaluated on held-out trajectories "
             f"of the deployment sampler (`{meta.get('sampler', 'ddim')}` under each model's scheduler, one "
             "trajectory per sampling step count 20, 25, 30, 50, two images each, seeds apart from "
             "calibration's: tfmqc's `--dump-eval`)"
             + (f", at most {meta['eval_per_step']} records per step." if meta.get("eval_per_step") else ".")
             + " onnxruntime's quantizer is calibrated on tfmqc's calibration records of the same sampler "
             "(`--dump-calib`: every step of the longest calibration trajectory).")
    L.append("")
    ts = f" --timesteps {meta['timesteps']}" if meta.get("timesteps") else ""
    L.append(f"- **tfmqc**: `tfmqc MODEL -o OUT{ts} --sampler {meta.get('sampler', 'ddim')} --weight-bits B "
             f"--seed {meta['seed']}` plus the model's deployment: "
             + "; ".join(f"{k}: `{' '.join(v)}`" for k, v in MODEL_ARGS.items())
             + "; the others: their metadata (DDIMScheduler defaults, clip_sample true).")
    L.append("- **min-max baseline**: the same with `--baseline minmax` (no TIB folding, one set of scales, "
             "min/max ranges, round-to-nearest weights, the same layers quantized).")
    L.append("- **ORT (same layers)**: `onnxruntime.quantization.quantize_static` on the float model: QDQ, "
             "per-channel weights (QInt8; QInt4 for W4), QUInt8 activations, MinMax, calibrated on the same "
             "records, with `nodes_to_exclude` = the nodes tfmqc keeps in float (report `kept_float`) plus "
             "the time-step block tfmqc folds into exact tables (`tfmqc inspect`: `tib.fold_nodes`; the report's "
             "`kept_float` does not list them). ORT still quantizes the inputs of every op it knows "
             "(Add, Mul, Sigmoid, Concat, Softmax, ...).")
    L.append("- **ORT (defaults)**: the same with nothing excluded.")
    L.append("- **ORT (tfmqc's layers only)**: the same with `nodes_to_quantize` = the layers tfmqc quantizes "
             "(report `layers`), so exactly the same Conv/Gemm/MatMul inputs and weights are quantized.")
    L.append("- All ORT variants run after `quant_pre_process` with ONNX shape inference only (its graph "
             "optimization would rename the nodes to exclude; its symbolic shape inference fails on several "
             "of these models and adds nothing: ONNX shape inference already types every tensor).")
    L.append("- **simulated**: onnxruntime with `ORT_DISABLE_ALL` (Q/DQ evaluated in float: the "
             "quantization itself). **ORT int8 kernels**: default optimizations (onnxruntime fuses QDQ "
             "into its int8 kernels where it can). The float reference runs with the same setting.")
    L.append("")
    cols = [SHORT_TITLES[v] for v in VARIANTS]
    for b in bits_list:
        key = f"w{b}a8"
        for mode, title in (("sim", "simulated (ORT_DISABLE_ALL)"),
                            ("kernel", "onnxruntime int8 kernels (default optimizations)")):
            L.append(f"## W{b}A8, {title}: mean dB / min dB")
            L.append("")
            L.append("| model | " + " | ".join(cols) + " |")
            L.append("| --- |" + " --- |" * len(cols))
            for name, r in results.items():
                if "error" in r and not r["bits"]:
                    L.append(f"| {name} | " + " | ".join([r["error"]] + ["–"] * (len(cols) - 1)) + " |")
                    continue
                cells = [cell_text(r["bits"][key][v], mode) for v in VARIANTS]
                L.append(f"| {name} | " + " | ".join(cells) + " |")
            L.append("")
    for b in bits_list:
        key = f"w{b}a8"
        L.append(f"## W{b}A8: model file sizes (bytes)")
        L.append("")
        L.append("| model | float | " + " | ".join(cols) + " |")
        L.append("| --- | ---: |" + " ---: |" * len(cols))
        for name, r in results.items():
            row = [str(r.get("float_bytes"))]
            for v in VARIANTS:
                c = r["bits"].get(key, {}).get(v, {})
                row.append(str(c["bytes"]) if c.get("bytes") else "–")
            L.append(f"| {name} | " + " | ".join(row) + " |")
        L.append("")
    for b in bits_list:
        key = f"w{b}a8"
        L.append(f"## W{b}A8: what onnxruntime ran with default optimizations")
        L.append("")
        L.append("Cells: fused int8 ops / Conv+MatMul+Gemm left in float / DequantizeLinear left, "
                 "counted in onnxruntime's optimized graph.")
        L.append("")
        L.append("| model | " + " | ".join(cols) + " |")
        L.append("| --- |" + " --- |" * len(cols))
        for name, r in results.items():
            row = []
            for v in VARIANTS:
                k = r["bits"].get(key, {}).get(v, {}).get("kernel_ops")
                row.append(f"{k['int8_ops']} / {k['float_conv_matmul_gemm']} / {k['dequantize_linear']}" if k else "–")
            L.append(f"| {name} | " + " | ".join(row) + " |")
        L.append("")
    L.append("## Details")
    L.append("")
    for name, r in results.items():
        bits_notes = []
        ex = r.get("excluded_nodes")
        line = f"- **{name}**: "
        if "calib_records" in r:
            shapes = ", ".join(f"{k} {v[0]}{v[1]}" for k, v in r.get("calib_record_shapes", {}).items())
            line += (f"{r['calib_records']} records ({shapes}) over {r['steps']} time steps "
                     f"(input `{r['timestep_input']}`), {r['eval_records']} evaluated")
        if ex:
            line += (f"; ORT (same layers) excludes {ex['count']} nodes ({len(ex['kept_float'])} `kept_float`: "
                     f"{', '.join('`' + n + '`' for n in ex['kept_float']) or 'none'}; "
                     f"{len(ex['added_tib_nodes'])} TIB nodes)")
        if r.get("tfmqc_layers"):
            line += f"; tfmqc quantizes {len(r['tfmqc_layers'])} layers"
        for b in bits_list:
            for v in VARIANTS:
                c = r["bits"].get(f"w{b}a8", {}).get(v, {})
                o = c.get("ort")
                t = SHORT_TITLES[v]
                if o and o.get("also_excluded"):
                    bits_notes.append(f"{t}: quantize_static cannot give a weight the "
                                      "quantization parameters of its consumer's input (\"shared mode is not "
                                      "supported for weight\"), so it also leaves "
                                      f"{', '.join('`' + n + '`' for n in o['also_excluded'])} in float")
                if o and b == 4:
                    if not o.get("per_channel", True) or o.get("failed_attempts"):
                        bits_notes.append(f"{t} W4: fell back to {o['weight_type']} "
                                          f"{'per-channel' if o['per_channel'] else 'per-tensor'} "
                                          f"({'; '.join(o.get('failed_attempts', []))})")
                    if "com.microsoft" in o.get("dequantize_domains", []):
                        bits_notes.append(f"ORT W4: QInt4 weights are written as com.microsoft DequantizeLinear "
                                          "(the model's opset is below 21)")
                if "error" in c and c["error"] not in ("tfmqc failed", "not run"):
                    bits_notes.append(f"{t} W{b}: {c['error']}")
                for mode in MODES:
                    s = c.get(mode)
                    if s and "error" in s:
                        bits_notes.append(f"{t} W{b} {mode}: {s['error']}")
        notes = r.get("notes", []) + sorted(set(bits_notes))
        if "error" in r:
            notes.insert(0, r["error"])
        L.append(line + ("." if not notes else ". " + " ".join(n if n.endswith(".") else n + "." for n in notes)))
    L.append("")
    if meta.get("failures"):
        L.append("## Failures")
        L.append("")
        for f in meta["failures"]:
            L.append(f"- {f.splitlines()[0]}")
        L.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(L))


def machine_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return platform.machine()


# --------------------------------------------------------------------------- main

def main() -> int:
    args = parse_args()
    ensure_python_env()
    import onnxruntime as ort

    command = invoked_command()
    bits_list = [int(b) for b in args.bits.split(",") if b.strip()]
    if any(b not in BITS for b in bits_list):
        die("--bits takes 8 and/or 4")
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    names = [m.strip() for m in args.models.split(",")] if args.models else default_models()
    if not names:
        die("no models to compare")
    t_start = time.time()
    tf = None if args.no_tfmqc else Tfmqc(args, workdir)
    args.inspector = None
    if tf is None:  # testing: still ask tfmqc which input is t and what its TIB is
        try:
            args.inspector = Tfmqc(args, workdir, inspect_only=True)
        except SystemExit:
            log("no tfmqc binary for `inspect`: guessing the time-step input, no TIB exclusion")
    log(f"models: {', '.join(names)}; tfmqc: {tf.version if tf else 'not run'}; onnxruntime {ort.__version__}")

    # onnxruntime's quantization tools leave temporary files in the working directory:
    # keep them in the work folder, not in the repository.
    for attr in ("out", "json"):
        setattr(args, attr, str(Path(getattr(args, attr)).resolve()))
    if args.no_tfmqc:
        args.no_tfmqc = str(Path(args.no_tfmqc).resolve())
    os.chdir(workdir.resolve())

    failures: list[str] = []
    results: dict = OrderedDict()
    for i, name in enumerate(names):
        log(f"[{i + 1}/{len(names)}] {name}")
        t0 = time.time()
        try:
            results[name] = compare_model(name, args, tf, workdir, bits_list, failures)
        except TfmqcFailed as e:
            die(str(e), 1)
        results[name]["seconds"] = round(time.time() - t0, 1)
        log(f"  {name} took {time.time() - t0:.0f} s")

    meta = {
        "command": command,
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_name(),
        "tfmqc_version": tf.version if tf else "tfmqc not run",
        "tfmqc_binary": str(tf.source) if tf else None,
        "tfmqc_binary_sha256_16": tf.sha256 if tf else None,
        "tfmqc_binary_mtime": tf.mtime if tf else None,
        "onnxruntime": ort.__version__,
        "python": sys.executable,
        "timesteps": args.timesteps,
        "sampler": args.sampler,
        "seed": args.seed,
        "eval_per_step": args.eval_per_step,
        "threads": args.threads,
        "seconds": round(time.time() - t_start, 1),
        "failures": failures,
    }
    out_md = (ROOT / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    out_json = (ROOT / args.json) if not Path(args.json).is_absolute() else Path(args.json)
    write_markdown(out_md, meta, results, bits_list)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(jsonable({"meta": meta, "models": results}), indent=1) + "\n")
    log(f"wrote {out_md} and {out_json} in {time.time() - t_start:.0f} s")
    if failures:
        print("compare_quant: tfmqc failed on:\n" + "\n".join("  " + f.splitlines()[0] for f in failures),
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
