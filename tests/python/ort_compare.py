"""onnxruntime on the calls tests/python/use_module.py made (run with target/pyenv's
python): prints the SQNR (dB) of each tfmqc prediction against onnxruntime on the same
file and inputs, as JSON.

    ort_compare.py UNCOND_Q COND_Q CALLS.npz
"""

import json
import sys

import numpy as np
import onnxruntime as ort

uncond_q, cond_q, calls = sys.argv[1:4]
c = np.load(calls)


def run(path, values):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = {}
    for i in sess.get_inputs():
        v = values[i.name]
        dtype = {"tensor(int64)": np.int64, "tensor(float)": np.float32}[i.type]
        feed[i.name] = np.asarray(v, dtype=dtype)
    return sess.run(None, feed)[0]


def sqnr(ref, got):
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    return float(10 * np.log10((ref ** 2).sum() / max(((ref - got) ** 2).sum(), 1e-30)))


x = c["x"]
t = np.full((x.shape[0],), c["t"])
tc = np.full((x.shape[0],), c["tc"])
ref_u = run(uncond_q, {"sample": x, "timestep": t})
ref_c = run(cond_q, {"sample": x, "timestep": tc, "encoder_hidden_states": c["h"]})
print(json.dumps({
    "uncond_positional": sqnr(ref_u, c["uncond_positional"]),
    "uncond_keyword": sqnr(ref_u, c["uncond_keyword"]),
    "cond_positional": sqnr(ref_c, c["cond_positional"]),
    "cond_keyword": sqnr(ref_c, c["cond_keyword"]),
}))
