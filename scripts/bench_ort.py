"""onnxruntime side of `tfmqc bench` (the ort-float and ort-int8 engines).

`tfmqc bench` runs this with the python of TFMQC_PYTHON (or target/pyenv) in a child
process of its own, so the peak RSS it reports is onnxruntime's alone:

    python bench_ort.py CONFIG_JSON

CONFIG_JSON (made by tfmqc from the tfmqc-int8 run of the same model, so every engine
sees the same batch, time step and trajectory):

    model, threads, seed                              what to run
    runs, loop_runs, budget_s                         how often: counts, or null to fit
                                                      budget_s seconds as tfmqc does
                                                      (`tfmqc bench --help`)
    inputs                                            safetensors with the conditioning
                                                      inputs (or null)
    sample_input, x_shape                             the noisy sample [B, C, H, W]
    timestep_input, t_dtype, t_shape, t               the time step of the step timing
    trajectory, alphas_cumprod                        the DDIM loop (ᾱ at each t)

Prints one JSON object: warmup, runs, step_ms (median), step_ms_min, loop_runs, loop_ms
(median, null when no loop ran), base_rss_mb
(VmRSS after imports, before loading), load_rss_mb (RssAnon added by creating the
session), peak_rss_mb (VmHWM), load_s.
"""

import ctypes
import json
import sys
import time

import numpy as np
import onnxruntime as ort
from safetensors.numpy import load_file


def rss_mb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return None


# A call slower than this is an SD-class one: one warm-up call (src/bench.rs SLOW_CALL_S).
SLOW_CALL_S = 1.0


def fitting(per_call, budget, lo, hi):
    """Calls of per_call seconds that fit in budget seconds, between lo and hi."""
    if per_call <= 0:
        return hi
    return max(lo, min(hi, int(budget // per_call)))


def main(cfg):
    base = rss_mb("VmRSS")
    anon = rss_mb("RssAnon")
    start = time.perf_counter()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = cfg["threads"]
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(cfg["model"], opts, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - start
    # As the Rust side: free heap goes back to the system before the RSS is read.
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    loaded = rss_mb("RssAnon")

    cond = load_file(cfg["inputs"]) if cfg["inputs"] else {}
    names = [i.name for i in sess.get_inputs()]
    sample, tname = cfg["sample_input"], cfg["timestep_input"]
    feed = {}
    for n in names:
        if n in (sample, tname):
            continue
        if n not in cond:
            sys.exit(f"{cfg['model']}: conditioning input '{n}' is not in {cfg['inputs']}")
        feed[n] = cond[n]
    rng = np.random.default_rng(cfg["seed"])
    x = rng.standard_normal(cfg["x_shape"]).astype(np.float32)
    channels = cfg["x_shape"][1]

    def step(xt, t):
        feed[sample] = xt
        feed[tname] = np.full(cfg["t_shape"], t, dtype=cfg["t_dtype"])
        eps = sess.run(None, feed)[0]
        # Learned variance (2·C channels): ε̂ is the first C, as the runtime does.
        return eps[:, :channels].astype(np.float32)

    # As tfmqc's worker (src/bench.rs): the first call sizes the rest.
    budget = cfg["budget_s"]
    t0 = time.perf_counter()
    step(x, cfg["t"])
    first = time.perf_counter() - t0
    warmup = 3 if first < SLOW_CALL_S else 1
    for _ in range(warmup - 1):
        step(x, cfg["t"])
    runs = cfg["runs"] if cfg["runs"] is not None else fitting(first, budget, 3, 21)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        step(x, cfg["t"])
        times.append(time.perf_counter() - t0)

    traj, ac = cfg["trajectory"], cfg["alphas_cumprod"]
    loop_runs = cfg["loop_runs"]
    if loop_runs is None:
        per_loop = float(np.median(times)) * len(traj)
        loop_runs = 0 if per_loop > budget else fitting(per_loop, budget, 1, 3)
    loops = []
    for _ in range(loop_runs):
        t0 = time.perf_counter()
        xs = rng.standard_normal(cfg["x_shape"]).astype(np.float32)
        for k, t in enumerate(traj):
            eps = step(xs, t)
            a, ap = ac[k], ac[k + 1] if k + 1 < len(traj) else 1.0
            x0 = np.clip((xs - np.sqrt(1 - a) * eps) / np.sqrt(a), -1, 1)
            xs = (np.sqrt(ap) * x0 + np.sqrt(1 - ap) * eps).astype(np.float32)
        loops.append(time.perf_counter() - t0)

    print(json.dumps({
        "warmup": warmup,
        "runs": runs,
        "step_ms": float(np.median(times)) * 1e3,
        "step_ms_min": float(np.min(times)) * 1e3,
        "loop_runs": loop_runs,
        "loop_ms": float(np.median(loops)) * 1e3 if loops else None,
        "base_rss_mb": base,
        "load_rss_mb": loaded - anon if loaded is not None and anon is not None else None,
        "peak_rss_mb": rss_mb("VmHWM"),
        "load_s": load_s,
    }))


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
