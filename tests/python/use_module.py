"""The `tfmqc` module as a user meets it after `pip install .` (run by tests/python_api.rs
with the fresh virtual environment's python: numpy and tfmqc only).

    use_module.py REPO UNCOND_Q WORKDIR

UNCOND_Q: models/ddpm_digits.onnx compiled by the `tfmqc` command. This script compiles
models/digits_cond.onnx with tfmqc.compile, calls both models positionally and the
diffusers way, checks the errors, and writes WORKDIR/calls.npz (inputs and predictions,
for onnxruntime to repeat) and prints a JSON summary.
"""

import json
import os
import sys

import numpy as np

import tfmqc

repo, uncond_q, work = sys.argv[1:4]
summary = {"version": tfmqc.__version__}


def expect_value_error(what, call, needle):
    try:
        call()
    except ValueError as e:
        assert needle in str(e), f"{what}: {e!r} does not say {needle!r}"
        summary.setdefault("errors", {})[what] = str(e)
        return
    raise AssertionError(f"{what}: no ValueError")


# The compiler: the CLI's options as keywords, the report back as a dict.
cond_q = os.path.join(work, "digits_cond.q.onnx")
report = tfmqc.compile(os.path.join(repo, "models/digits_cond.onnx"), cond_q,
                       timesteps="ddim:10", calib_samples=2, calib_steps=10, seed=0)
assert isinstance(report, dict) and os.path.exists(cond_q), report
summary["report_keys"] = sorted(report)
expect_value_error("compile: unknown option",
                   lambda: tfmqc.compile("m.onnx", "o.onnx", no_such_option=1),
                   "no-such-option")

rng = np.random.default_rng(0)
x = rng.standard_normal((2, 1, 16, 16)).astype(np.float32)

# Unconditional: positionally (an array back), the diffusers way (`.sample`, `[0]`).
d = tfmqc.Denoiser(uncond_q, threads=1)
ts = d.timesteps
assert ts == sorted(ts) and len(ts) == 10, ts
t = ts[len(ts) // 2]
roles = {i["name"]: i["role"] for i in d.inputs}
assert sorted(roles.values()) == ["sample", "timestep"], d.inputs
pos = d(x, t)
assert isinstance(pos, np.ndarray) and pos.shape == x.shape and pos.dtype == np.float32
pos[0, 0, 0, 0] = pos[0, 0, 0, 0]  # writable
out = d(x, np.array([t, t]), return_dict=True)
assert isinstance(out, tfmqc.DenoiserOutput) and out[0] is out.sample
np.testing.assert_array_equal(out.sample, pos)
(tup,) = d(sample=x, timestep=np.int64(t), return_dict=False)
np.testing.assert_array_equal(tup, pos)

# Conditional: conditioning positionally or by name, as diffusers passes it.
dc = tfmqc.Denoiser(cond_q)
assert dc.conditioning_inputs == ["encoder_hidden_states"], dc.inputs
h = rng.standard_normal((2, 4, 32)).astype(np.float32)
tc = dc.timesteps[-1]
posc = dc(x, tc, h)
kwc = dc(x, float(tc), encoder_hidden_states=h.astype(np.float64), cross_attention_kwargs=None)
assert isinstance(kwc, tfmqc.DenoiserOutput)
np.testing.assert_array_equal(kwc.sample, posc)

# Errors carry the runtime's message.
expect_value_error("t outside S", lambda: d(x, t + 1), "not in the model's time-step set")
expect_value_error("sample shape", lambda: d(x[:, :, :8, :8], t), "sample dim 2 is 8")
expect_value_error("missing conditioning", lambda: dc(x, tc), "'encoder_hidden_states' was not given")
expect_value_error("conditioning dtype", lambda: dc(x, tc, h.astype(np.int64)), "the model wants float32")
expect_value_error("unknown input", lambda: dc(x, tc, h, text=h), "not a conditioning input")
expect_value_error("sampler steps", lambda: d.sample(0, steps=7), "visits t =")
try:
    tfmqc.Denoiser(os.path.join(work, "missing.onnx"))
    raise AssertionError("loading a missing file succeeded")
except FileNotFoundError:
    pass

# A sampling loop: DDIM at 10 steps visits exactly S = ddim:10.
images = d.sample(seed=0, steps=10, batch=2, sampler="ddim")
assert images.shape == (2, 1, 16, 16) and np.isfinite(images).all()
np.testing.assert_array_equal(images, d.sample(seed=0, steps=10, batch=2, sampler="ddim"))
guided = dc.sample(seed=1, steps=10, cond={"encoder_hidden_states": h[:1]}, batch=1,
                   guidance_scale=2.0, uncond={"encoder_hidden_states": np.zeros_like(h[:1])})
assert guided.shape == (1, 1, 16, 16) and np.isfinite(guided).all()

# Hostile inputs (issue #20): every failure is an Exception subclass (ValueError, OSError,
# RuntimeError), never pyo3's PanicException (a BaseException) nor an abort. The fuzz
# seeds and past findings are the files nobody meant to be models; a batch or a step count
# that cannot be allocated, and arrays whose bytes do not match their shape, the calls.
def expect_exception(what, call):
    try:
        call()
    except Exception as e:  # noqa: BLE001 - any Exception is the point; BaseException is not
        summary.setdefault("hostile", {})[what] = type(e).__name__
        return
    raise AssertionError(f"{what}: no exception")


fuzz_files = []
for folder in ("fuzz/seeds/onnx", "fuzz/regressions/onnx_import", "fuzz/regressions/denoiser_load"):
    folder = os.path.join(repo, folder)
    if os.path.isdir(folder):
        fuzz_files += [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
loaded = 0
for path in fuzz_files:
    try:
        m = tfmqc.Denoiser(path, threads=1)
        loaded += 1
        m.timesteps, m.inputs, m.sample_shape  # noqa: B018 - each is a native call
    except Exception:  # noqa: BLE001
        pass
summary["fuzz_files"] = {"files": len(fuzz_files), "loaded": loaded}
expect_exception("batch 2^60", lambda: d.sample(seed=0, steps=10, batch=1 << 60))
expect_exception("steps 2^40", lambda: d.sample(seed=0, steps=1 << 40))
expect_exception("threads 0", lambda: tfmqc.Denoiser(uncond_q, threads=0))
expect_exception("unknown sampler", lambda: d.sample(seed=0, steps=10, sampler="nope"))
expect_exception("shape beyond its bytes",
                 lambda: d._native.denoise(("float32", [1 << 40, 1, 16, 16], b"\0" * 16), t, []))
expect_exception("unknown dtype", lambda: d._native.denoise(("complex64", [1], b"\0" * 8), t, []))
expect_exception("trajectory steps 0", lambda: d._native.trajectory("ddim", 0))
expect_exception("run: bad model", lambda: tfmqc._tfmqc.run(["tfmqc", "inspect", fuzz_files[0]]))

np.savez(os.path.join(work, "calls.npz"), x=x, t=np.int64(t), tc=np.int64(tc), h=h,
         uncond_positional=pos, uncond_keyword=out.sample, cond_positional=posc,
         cond_keyword=kwc.sample)
summary["t"], summary["tc"] = t, tc
print(json.dumps(summary))
