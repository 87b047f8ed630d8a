"""Re-check every shipped model without PyTorch: check_model(full_check=True),
external data files must exist beside the model and hold every external tensor's bytes,
onnxruntime on <name>.inputs.safetensors must reproduce <name>.outputs.safetensors,
and models with a symbolic batch dim must give per-sample identical results at
batch 1 and batch 3.

    /tmp/mvenv/bin/python models/check_all.py
"""
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file

HERE = Path(__file__).resolve().parent


def check_external_data(path: Path) -> dict:
    """Every tensor stored as external data must name a plain file beside the model, and its
    [offset, offset + length) must lie inside that file. Returns {file name: bytes used}."""
    path = Path(path)
    m = onnx.load(str(path), load_external_data=False)
    tensors = list(m.graph.initializer)
    for n in m.graph.node:
        tensors += [a.t for a in n.attribute if a.HasField("t")]
    used = {}
    for t in tensors:
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        d = {e.key: e.value for e in t.external_data}
        loc = d["location"]
        assert "/" not in loc and "\\" not in loc and loc not in (".", ".."), (path.name, t.name, loc)
        f = path.parent / loc
        assert f.is_file(), f"{path.name}: external data file {f} for tensor {t.name!r} not found"
        off, length = int(d.get("offset", 0)), int(d["length"])
        assert off + length <= f.stat().st_size, (path.name, t.name, off, length, f.stat().st_size)
        used[loc] = used.get(loc, 0) + length
    return used


def main():
    ok = True
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    for path in sorted(HERE.glob("*.onnx")):
        name = path.stem
        ext = check_external_data(path)  # before check_model: a missing file gets a clear message
        onnx.checker.check_model(str(path), full_check=True)
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        onames = [o.name for o in sess.get_outputs()]
        if name.endswith(".q") and not (HERE / f"{name}.inputs.safetensors").exists():
            # a quantized twin (conv3x3_64.q.onnx): runs on its float model's inputs; the distance to
            # the float outputs is information, not a check
            base = name[:-2]
            ins = load_file(str(HERE / f"{base}.inputs.safetensors"))
            outs = load_file(str(HERE / f"{base}.outputs.safetensors"))
            got = dict(zip(onames, sess.run(onames, ins)))
            d = max(float(np.max(np.abs(got[k] - outs[k]))) for k in onames)
            print(f"{path.name:28s} {path.stat().st_size:9d} B  runs on {base}'s inputs; "
                  f"max|diff| to the float outputs {d:.2e} (quantized, not checked)")
            continue
        ins = load_file(str(HERE / f"{name}.inputs.safetensors"))
        outs = load_file(str(HERE / f"{name}.outputs.safetensors"))
        got = dict(zip(onames, sess.run(onames, ins)))
        d = max(float(np.max(np.abs(got[k] - outs[k]))) for k in onames)
        line = f"{path.name:28s} {path.stat().st_size:9d} B  reproduce max|diff| {d:.2e}"
        ok &= d < 1e-5
        for loc, n in ext.items():
            line += f"; external data {loc} found ({n} B of tensors)"
        dyn = [i for i in sess.get_inputs() if i.shape and isinstance(i.shape[0], str)]
        if dyn:
            b = next(iter(ins.values())).shape[0]
            # batch 3 = the example batch with sample 0 repeated; batch 1 = sample 0
            big = {k: np.concatenate([v, v[:1]], 0) if v.ndim else v for k, v in ins.items()}
            one = {k: v[:1] if v.ndim else v for k, v in ins.items()}
            r_big = dict(zip(onames, sess.run(onames, big)))
            r_one = dict(zip(onames, sess.run(onames, one)))
            dd = 0.0
            for k in onames:
                dd = max(dd, float(np.max(np.abs(r_big[k][:b] - outs[k]))),
                         float(np.max(np.abs(r_big[k][b] - outs[k][0]))),
                         float(np.max(np.abs(r_one[k][0] - outs[k][0]))))
            line += f"; batch {b + 1}/1 consistency max|diff| {dd:.2e}"
            ok &= dd < 1e-4
        print(line)
    print("ALL OK" if ok else "SOME CHECKS FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
