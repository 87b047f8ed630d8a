"""Writes the committed seed corpora of the fuzz targets (fuzz/seeds/) from models/ and
the cases of tests/bad_input.rs. Kept small (each file a few KB, the whole under 1 MB):
tests/fuzz_corpus.rs runs the command line over every file here, and libFuzzer
explores from them. Needs onnx and numpy (target/pyenv after scripts/test.sh) and a release build of tfmqc
(target/release/tfmqc, or the path in $TFMQC) to quantize two models:

    cargo build --release && target/pyenv/bin/python fuzz/make_seeds.py
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEDS = os.path.join(ROOT, "fuzz", "seeds")
MODELS = os.path.join(ROOT, "models")

# The fuzz targets resolve external data in a folder holding `w.data`: this many zero
# bytes (fuzz_targets/common.rs); skeletons point every large initializer at its start.
W_DATA_BYTES = 1 << 22


def write(sub, name, data):
    d = os.path.join(SEEDS, sub)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def model(nodes, inputs, outputs, inits=(), opset=17, meta=None, name="seed"):
    g = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 8
    for k, v in (meta or {}).items():
        e = m.metadata_props.add()
        e.key, e.value = k, v
    return m


def f32(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def tiny_denoiser():
    """y = x * float(t): a denoiser the runtime loads (rank-4 sample, a time step)."""
    return model(
        [
            helper.make_node("Cast", ["t"], ["tf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "tf"], ["y"]),
        ],
        [f32("x", [1, 1, 4, 4]), helper.make_tensor_value_info("t", TensorProto.INT64, [1])],
        [f32("y", [1, 1, 4, 4])],
    )


def tiny_conditional():
    """y = x * float(t) + c: conditioning input `c` (for --cond files)."""
    return model(
        [
            helper.make_node("Cast", ["t"], ["tf"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["x", "tf"], ["xt"]),
            helper.make_node("Add", ["xt", "c"], ["y"]),
        ],
        [
            f32("x", [1, 1, 4, 4]),
            helper.make_tensor_value_info("t", TensorProto.INT64, [1]),
            f32("c", [1, 1, 1, 4]),
        ],
        [f32("y", [1, 1, 4, 4])],
    )


def external(t, offset=0, location="w.data", n=None):
    """`t` as ONNX external data at `offset` of `location` (its bytes dropped)."""
    if n is None:
        n = len(t.raw_data) if t.raw_data else numpy_helper.to_array(t).nbytes
    t.ClearField("raw_data")
    for f in ("float_data", "int32_data", "int64_data", "double_data", "uint64_data"):
        t.ClearField(f)
    t.data_location = TensorProto.EXTERNAL
    del t.external_data[:]
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(n))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return t


def encodings():
    """An initializer in every encoding the importer reads, each consumed by a node."""
    inits = [
        numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "raw_f32"),
        helper.make_tensor("typed_f32", TensorProto.FLOAT, [3], [1.0, -2.0, 3.5]),
        helper.make_tensor("typed_f64", TensorProto.DOUBLE, [2], [0.25, 1e300]),
        helper.make_tensor("typed_i64", TensorProto.INT64, [2], [-1, 1 << 40]),
        helper.make_tensor("typed_i32", TensorProto.INT32, [2], [-7, 7]),
        helper.make_tensor("typed_i8", TensorProto.INT8, [3], [-128, 0, 127]),
        helper.make_tensor("typed_u8", TensorProto.UINT8, [2], [0, 255]),
        helper.make_tensor("typed_bool", TensorProto.BOOL, [2], [True, False]),
        helper.make_tensor("typed_f16", TensorProto.FLOAT16, [2], np.array([1.5, -2], np.float16).view(np.uint16).tolist(), raw=False),
        helper.make_tensor("typed_u64", TensorProto.UINT64, [1], [1 << 63]),
        helper.make_tensor("typed_u32", TensorProto.UINT32, [1], [4000000000]),
        helper.make_tensor("typed_str", TensorProto.STRING, [2], [b"a", b"bc"]),
        helper.make_tensor("typed_i4", TensorProto.INT4, [3], [-8, 7, 1]),
        external(numpy_helper.from_array(np.zeros(4, np.float32), "ext_f32"), offset=64),
        helper.make_tensor("empty", TensorProto.FLOAT, [0, 3], []),
    ]
    nodes = [helper.make_node("Identity", [t.name], [t.name + "_out"]) for t in inits]
    outs = [helper.make_tensor_value_info(t.name + "_out", t.data_type, None) for t in inits]
    return model(nodes, [], outs, inits, opset=21)


def constant_and_if():
    """A Constant node (tensor, floats, ints) and an If whose branches read the outer x."""
    then_g = helper.make_graph([helper.make_node("Relu", ["x"], ["r"])], "then", [], [f32("r", [2])])
    else_g = helper.make_graph([helper.make_node("Neg", ["x"], ["n"])], "else", [], [f32("n", [2])])
    nodes = [
        helper.make_node("Constant", [], ["c"], value=helper.make_tensor("v", TensorProto.FLOAT, [2], [1, 2])),
        helper.make_node("Constant", [], ["ci"], value_ints=[1, 2, 3]),
        helper.make_node("Constant", [], ["cf"], value_floats=[0.5]),
        helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("b", TensorProto.BOOL, [], [True])),
        helper.make_node("If", ["cond"], ["y0"], then_branch=then_g, else_branch=else_g),
        helper.make_node("Add", ["y0", "c"], ["y"]),
    ]
    return model(nodes, [f32("x", [2])], [f32("y", [2])])


def skeleton(path):
    """A model with every initializer over 1 KB made external data at the start of
    `w.data` (zeros): the real graph (nodes, attributes, metadata, and the scales and
    zero points of a quantized one) in tens of KB."""
    m = onnx.load(path, load_external_data=False)
    for t in m.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            t.ClearField("external_data")
            t.data_location = TensorProto.DEFAULT
        n = int(np.prod(t.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
        if n > 1024:
            assert n <= W_DATA_BYTES, (path, t.name, n)
            external(t, n=n)
    return m.SerializeToString()


def bad_inputs():
    """The files of tests/bad_input.rs, small."""
    tiny = tiny_denoiser()
    good = tiny.SerializeToString()
    write("onnx", "bad_truncated.onnx", good[: len(good) // 2])
    write("onnx", "bad_text.onnx", b"this is not a model\n")
    write("onnx", "bad_empty.onnx", b"")
    m = tiny_denoiser()
    m.graph.initializer.append(helper.make_tensor("weird_weight", TensorProto.FLOAT, [1], [1]))
    m.graph.initializer[-1].data_type = 99
    write("onnx", "bad_dtype.onnx", m.SerializeToString())
    m = model(
        [
            helper.make_node("Add", ["x", "b"], ["a"], name="add"),
            helper.make_node("Relu", ["a"], ["b"], name="relu"),
            helper.make_node("Identity", ["b"], ["y"], name="id"),
        ],
        [f32("x", [2])],
        [f32("y", [2])],
    )
    write("onnx", "bad_cycle.onnx", m.SerializeToString())
    m = tiny_denoiser()
    m.opset_import[0].version = 99
    write("onnx", "bad_opset.onnx", m.SerializeToString())
    m = tiny_denoiser()
    m.graph.node[1].input[0] = "ghost"
    write("onnx", "bad_ghost.onnx", m.SerializeToString())
    m = tiny_denoiser()
    huge = TensorProto(name="huge", data_type=TensorProto.FLOAT, dims=[1 << 40, 1 << 40, 1 << 40])
    m.graph.initializer.append(huge)
    write("onnx", "bad_huge_dims.onnx", m.SerializeToString())
    m = tiny_denoiser()
    m.graph.initializer.append(external(numpy_helper.from_array(np.zeros(4, np.float32), "far"), offset=W_DATA_BYTES))
    write("onnx", "bad_external_offset.onnx", m.SerializeToString())


def external_seeds():
    """onnx_external: a 4-byte model length, the model, then the bytes of `w.data`."""

    def pack(m, data):
        b = m.SerializeToString()
        return struct.pack("<I", len(b)) + b + data

    data = np.arange(16, dtype=np.float32).tobytes()
    for name, loc, off in [
        ("ok", "w.data", 0),
        ("offset", "w.data", 48),
        ("beyond", "w.data", 60),
        ("parent", "../w.data", 0),
        ("absolute", "/etc/hostname", 0),
        ("symlink", "out.data", 0),
    ]:
        m = tiny_denoiser()
        m.graph.initializer.append(external(numpy_helper.from_array(np.ones(4, np.float32), "w"), off, loc))
        m.graph.node.append(helper.make_node("Identity", ["w"], ["w_out"]))
        m.graph.output.append(f32("w_out", [4]))
        write("onnx_external", f"{name}.bin", pack(m, data))


def calib_seeds():
    for f in ["ddpm_digits.inputs.safetensors", "digits_cond.calib.safetensors", "unet2d_cond.inputs.safetensors"]:
        shutil.copy(os.path.join(MODELS, f), os.path.join(SEEDS, "calib", f))
    rng = np.random.default_rng(0)
    arrays = {
        "x": rng.standard_normal((2, 1, 4, 4)).astype(np.float32),
        "t": np.array([0, 999], np.int64),
        "c": rng.standard_normal((2, 1, 1, 4)).astype(np.float32),
        "uncond/c": np.zeros((1, 1, 1, 4), np.float32),
        "f16": np.ones(3, np.float16),
        "u8": np.arange(5, dtype=np.uint8),
        "b": np.array([True, False]),
        "scalar": np.float64(2.5),
    }
    for name, saver in [("stored.npz", np.savez), ("deflated.npz", np.savez_compressed)]:
        p = os.path.join(SEEDS, "calib", name)
        saver(p, **arrays)
    with open(os.path.join(SEEDS, "calib", "bad_truncated.npz"), "wb") as f:
        f.write(open(os.path.join(SEEDS, "calib", "deflated.npz"), "rb").read()[:300])
    write("calib", "bad_text.safetensors", b"not tensors\n")


def scheduler_seeds():
    for f in ["digits_cond.scheduler_config.json", "sd_tiny.scheduler_config.json"]:
        shutil.copy(os.path.join(MODELS, f), os.path.join(SEEDS, "scheduler", f))
    shutil.copy(os.path.join(ROOT, "tests", "data", "sd15_scheduler_config.json"), os.path.join(SEEDS, "scheduler", "sd15.json"))
    variants = {
        "trained_betas.json": {"num_train_timesteps": 4, "trained_betas": [0.1, 0.2, 0.3, 0.4], "prediction_type": "v_prediction"},
        "dpm.json": {"_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 50, "beta_schedule": "squaredcos_cap_v2", "solver_order": 2, "timestep_spacing": "trailing", "thresholding": True, "final_sigmas_type": "zero", "lower_order_final": True},
        "euler.json": {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 10, "timestep_spacing": "linspace", "steps_offset": 3, "clip_sample": True, "clip_sample_range": 2.0},
        "legacy.json": {"train_timesteps": "1000", "beta_schedule": "scaled-linear", "beta_start": "0.00085", "beta_end": "0.012"},
    }
    for name, v in variants.items():
        write("scheduler", name, json.dumps(v).encode())
    write("scheduler", "python_nan.json", b'{"beta_start": NaN, "beta_end": Infinity, "variance_type": "learned_range"}')
    write("scheduler", "bad_text.json", b"[1, 2")


def main():
    if os.path.isdir(SEEDS):
        shutil.rmtree(SEEDS)
    os.makedirs(os.path.join(SEEDS, "calib"))
    os.makedirs(os.path.join(SEEDS, "scheduler"))
    write("onnx", "tiny_denoiser.onnx", tiny_denoiser().SerializeToString())
    write("onnx", "tiny_conditional.onnx", tiny_conditional().SerializeToString())
    write("onnx", "encodings.onnx", encodings().SerializeToString())
    write("onnx", "constant_if.onnx", constant_and_if().SerializeToString())
    # Two float UNets (one with attention) and quantized ones, whose loading lowers their
    # Convs, Gemms and attention products to the int8 ops. sd_tiny and digits_cond would
    # add 1 MB of node names for little: libFuzzer mutates every seed it keeps.
    for name in ["ddpm_digits", "unet2d_attn", "conv3x3_64.q"]:
        write("onnx", f"{name}.skel.onnx", skeleton(os.path.join(MODELS, name + ".onnx")))
    tfmqc = os.environ.get("TFMQC", os.path.join(ROOT, "target", "release", "tfmqc"))
    tmp = tempfile.mkdtemp()
    for name in ["ddpm_digits", "unet2d_attn"]:
        q = os.path.join(tmp, name + ".q.onnx")
        subprocess.run(
            [tfmqc, os.path.join(MODELS, name + ".onnx"), "-o", q, "--timesteps", "ddim:10",
             "--calib-samples", "2", "--calib-steps", "2", "--reconstruct", "none"],
            check=True, stderr=subprocess.DEVNULL)
        write("onnx", f"{name}.q.skel.onnx", skeleton(q))
    shutil.rmtree(tmp)
    bad_inputs()
    external_seeds()
    calib_seeds()
    scheduler_seeds()
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(SEEDS) for f in fs)
    print(f"fuzz/seeds: {total} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
