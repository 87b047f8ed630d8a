"""How onnxruntime runs the forms a convolution with per-step activation scales can take.

Issue #14 item 4 asks that onnxruntime on tfmqc's file beat onnxruntime on the float file.
The default file (FSC, issue #15) gives some activations a scale per step group, s[g],
read at run time; onnxruntime fuses Q/DQ into its int8 kernels only with constant scales.
This script builds one 3×3 convolution (C → C channels on H × W, one image) in each form
and times it in onnxruntime at 1 and 2 threads (minimum of 30 calls after 5 warm-ups):

- float:        Conv in f32 (the reference; `err` is the max abs difference to it).
- perstep_dq:   what tfmqc writes today: Div(x, s) → Q(·, 1, z) → DQ(·, 1, z) → Mul(·, s)
                → Conv(·, DQ(Wq)) — onnxruntime runs the Conv in float, plus four
                element-wise passes.
- convinteger:  Div → Q → ConvInteger(u8, s8) → Cast → Mul(s · sw) → Add(b): the standard
                integer op, no constant scale needed.
- unitq_noout:  the step's scale moved behind the (linear) Conv: Div → Q(1, z) → DQ(1, z)
                → Conv(·, DQ(Wq)) → Mul(s) → Add(b), no output Q.
- unitq_outq:   as unitq_noout with a constant-scale Q/DQ pair on the Conv's output (in
                the unit-scaled space, scale from the float output's range here): the
                DQ → Conv → Q pattern onnxruntime fuses into QLinearConv.

    target/pyenv/bin/python scripts/ort_perstep_forms.py [C] [HW]

Only timing and a max error; a real compile would calibrate the output pair's scale on
the steps (its cost in output SQNR is the open question, BENCHMARKS.md, issue #14).
"""
import sys
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto as T
from onnx import helper as h
from onnx import numpy_helper as nh

C = int(sys.argv[1]) if len(sys.argv) > 1 else 128
HW = int(sys.argv[2]) if len(sys.argv) > 2 else 32
rng = np.random.default_rng(0)
W = rng.standard_normal((C, C, 3, 3)).astype(np.float32) * 0.05
sw = np.abs(W).reshape(C, -1).max(1) / 127
Wq = np.round(W / sw[:, None, None, None]).astype(np.int8)
b = rng.standard_normal(C).astype(np.float32) * 0.1
x = rng.standard_normal((1, C, HW, HW)).astype(np.float32)
sx = np.float32(np.abs(x).max() * 2 / 255)


def init(name, a):
    return nh.from_array(np.asarray(a), name)


def model(nodes, extra=()):
    inits = [init("W", W), init("b", b), init("Wq", Wq), init("sw", sw.astype(np.float32)),
             init("one", np.float32(1)), init("z", np.uint8(128)), init("zw", np.zeros(C, np.int8)),
             init("shp", np.array([C, 1, 1], np.int64)), *extra]
    g = h.make_graph(nodes, "conv",
                     [h.make_tensor_value_info("x", T.FLOAT, [1, C, HW, HW]),
                      h.make_tensor_value_info("s", T.FLOAT, [])],
                     [h.make_tensor_value_info("y", T.FLOAT, None)], inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


n = h.make_node
quant_in = [n("Div", ["x", "s"], ["xs"]), n("QuantizeLinear", ["xs", "one", "z"], ["q"])]
dq_w = n("DequantizeLinear", ["Wq", "sw", "zw"], ["Wd"], axis=0)
bias_after = [n("Mul", ["yc", "s"], ["ym"]), n("Reshape", ["b", "shp"], ["b4"]), n("Add", ["ym", "b4"], ["y"])]
forms = {
    "float": lambda: model([n("Identity", ["s"], ["s_"]), n("Conv", ["x", "W", "b"], ["y"], pads=[1] * 4)]),
    "perstep_dq": lambda: model(quant_in + [
        n("DequantizeLinear", ["q", "one", "z"], ["dq"]), n("Mul", ["dq", "s"], ["xd"]), dq_w,
        n("Conv", ["xd", "Wd", "b"], ["y"], pads=[1] * 4)]),
    "convinteger": lambda: model(quant_in + [
        n("ConvInteger", ["q", "Wq", "z"], ["acc"], pads=[1] * 4), n("Cast", ["acc"], ["accf"], to=T.FLOAT),
        n("Mul", ["sw", "s"], ["m"]), n("Reshape", ["m", "shp"], ["m4"]), n("Mul", ["accf", "m4"], ["ym"]),
        n("Reshape", ["b", "shp"], ["b4"]), n("Add", ["ym", "b4"], ["y"])]),
    "unitq_noout": lambda: model(quant_in + [
        n("DequantizeLinear", ["q", "one", "z"], ["dq"]), dq_w, n("Conv", ["dq", "Wd"], ["yc"], pads=[1] * 4)]
        + bias_after),
}
feeds = {"x": x, "s": np.array(sx, np.float32)}


def session(m, threads):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    return ort.InferenceSession(m, so, providers=["CPUExecutionProvider"])


ref = session(forms["float"](), 1).run(None, feeds)[0]
# The output pair's scale: the unit-scaled output's range (here from the float output).
sy = np.float32(np.abs(ref).max() * 2 / 255 / sx)
forms["unitq_outq"] = lambda: model(quant_in + [
    n("DequantizeLinear", ["q", "one", "z"], ["dq"]), dq_w, n("Conv", ["dq", "Wd"], ["yq0"], pads=[1] * 4),
    n("QuantizeLinear", ["yq0", "sy", "z"], ["yq"]), n("DequantizeLinear", ["yq", "sy", "z"], ["yc"])]
    + bias_after, extra=[init("sy", sy)])
print(f"3x3 conv {C}->{C} at {HW}x{HW}, onnxruntime {ort.__version__}")
for name, make in forms.items():
    for threads in (1, 2):
        s = session(make(), threads)
        y = s.run(None, feeds)[0]
        for _ in range(5):
            s.run(None, feeds)
        ts = []
        for _ in range(30):
            t = time.perf_counter()
            s.run(None, feeds)
            ts.append(time.perf_counter() - t)
        print(f"{name:<12} {threads} thread(s) {min(ts) * 1e3:8.3f} ms   err {np.abs(y - ref).max():.2e}")
