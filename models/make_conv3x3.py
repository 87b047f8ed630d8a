"""conv3x3_64.onnx and conv3x3_64.q.onnx: one 3x3 convolution 64 -> 64 channels at 32x32
(pad 1, bias), float and QDQ W8A8, for timing the int8 kernels on a single layer.

The QDQ file is what tfmqc would write for the layer if it had a time step and were not
the first and last conv: the input goes through QuantizeLinear/DequantizeLinear (u8, per
tensor, scale from the min/max of the reference input), the weights are int8 behind a
DequantizeLinear with per-output-channel scales (max |w| / 127, zero point 0).

Needs only onnx, onnxruntime, numpy and safetensors (no torch):
    target/pyenv/bin/python models/make_conv3x3.py
"""
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent
C, H, W = 64, 32, 32


def build(quantized: bool, w: np.ndarray, b: np.ndarray, x: np.ndarray) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(b, "b")]
    nodes = []
    conv_in, conv_w = "x", "w"
    if quantized:
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        a_scale = np.float32((hi - lo) / 255.0)
        a_zp = np.uint8(np.clip(np.round(-lo / a_scale), 0, 255))
        w_scale = (np.abs(w).reshape(C, -1).max(axis=1) / 127.0).astype(np.float32)
        wq = np.clip(np.round(w / w_scale[:, None, None, None]), -127, 127).astype(np.int8)
        inits += [
            numpy_helper.from_array(np.array(a_scale, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(a_zp, np.uint8), "x_zp"),
            numpy_helper.from_array(wq, "w_q"),
            numpy_helper.from_array(w_scale, "w_scale"),
            numpy_helper.from_array(np.zeros(C, np.int8), "w_zp"),
        ]
        nodes += [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zp"], ["x_q"]),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zp"], ["x_dq"]),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zp"], ["w_dq"], axis=0),
        ]
        conv_in, conv_w = "x_dq", "w_dq"
    else:
        inits.append(numpy_helper.from_array(w, "w"))
    nodes.append(
        helper.make_node(
            "Conv", [conv_in, conv_w, "b"], ["y"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]
        )
    )
    graph = helper.make_graph(
        nodes,
        "conv3x3_64" + ("_qdq" if quantized else ""),
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, C, H, W])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, C, H, W])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    rng = np.random.default_rng(0)
    # Kaiming-uniform-like weights, as torch.nn.Conv2d initializes them.
    bound = 1.0 / np.sqrt(C * 9)
    w = rng.uniform(-bound, bound, (C, C, 3, 3)).astype(np.float32)
    b = rng.uniform(-bound, bound, C).astype(np.float32)
    x = rng.standard_normal((1, C, H, W)).astype(np.float32)
    for quantized, name in [(False, "conv3x3_64.onnx"), (True, "conv3x3_64.q.onnx")]:
        model = build(quantized, w, b, x)
        onnx.save(model, HERE / name)
    sess = ort.InferenceSession(str(HERE / "conv3x3_64.onnx"), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {"x": x})
    save_file({"x": x}, str(HERE / "conv3x3_64.inputs.safetensors"))
    save_file({"y": y}, str(HERE / "conv3x3_64.outputs.safetensors"))
    print("wrote conv3x3_64.onnx, conv3x3_64.q.onnx and their safetensors")


if __name__ == "__main__":
    main()
