"""Shared helpers for the model-export scripts in models/.

Every script imports this module (it sits next to them, so running
`python models/<script>.py` from the repo root works).
"""
import collections
import json
import os
import random
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from safetensors.numpy import save_file

HERE = Path(__file__).resolve().parent


def seed_all(seed: int = 0) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_num_threads(int(os.environ.get("MODELS_THREADS", "2")))
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
    except Exception:  # pragma: no cover
        pass


def out_path(name: str) -> Path:
    return HERE / name


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def add_metadata(path: Path, props: dict) -> None:
    """Attach metadata_props to an exported ONNX file (in place)."""
    m = onnx.load(str(path))
    existing = {p.key: p for p in m.metadata_props}
    for k, v in props.items():
        if k in existing:
            existing[k].value = str(v)
        else:
            e = m.metadata_props.add()
            e.key = k
            e.value = str(v)
    onnx.save(m, str(path))


def op_histogram(path: Path) -> dict:
    """Op types (incl. those inside subgraphs / local functions) -> count."""
    m = onnx.load(str(path), load_external_data=False)
    c = collections.Counter()

    def walk(g):
        for n in g.node:
            c[(n.domain + "::" if n.domain else "") + n.op_type] += 1
            for a in n.attribute:
                if a.type == onnx.AttributeProto.GRAPH:
                    walk(a.g)
                for sg in a.graphs:
                    walk(sg)

    walk(m.graph)
    for f in m.functions:
        for n in f.node:
            c["fn:" + n.op_type] += 1
    return dict(sorted(c.items()))


def graph_io(path: Path):
    m = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in m.graph.initializer}

    def desc(v):
        t = v.type.tensor_type
        dims = []
        for d in t.shape.dim:
            dims.append(d.dim_param if d.dim_param else d.dim_value)
        return {
            "name": v.name,
            "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
            "shape": dims,
        }

    ins = [desc(v) for v in m.graph.input if v.name not in init]
    outs = [desc(v) for v in m.graph.output]
    opset = {o.domain or "ai.onnx": o.version for o in m.opset_import}
    return ins, outs, opset


def _c(a):
    """C-contiguous copy that keeps 0-d arrays 0-d (np.ascontiguousarray would make them 1-d)."""
    return np.array(a, order="C", copy=True)


def verify_and_save_io(path: Path, inputs: dict, torch_outputs: dict, atol: float = 1e-4,
                       session_config: dict | None = None):
    """check_model(full_check), run onnxruntime on `inputs` (name -> np array),
    compare with the PyTorch outputs (name -> np array), and write
    <name>.inputs.safetensors / <name>.outputs.safetensors.
    The model is checked and loaded by path, so external data beside it is found
    (and models over 2 GB work); `session_config` adds onnxruntime session config entries.
    Returns dict with a summary (max abs diffs, io description, ops)."""
    path = Path(path)
    onnx.checker.check_model(str(path), full_check=True)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    for k, v in (session_config or {}).items():
        so.add_session_config_entry(k, v)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    sess_in = [i.name for i in sess.get_inputs()]
    assert set(sess_in) == set(inputs), (sess_in, list(inputs))
    for i in sess.get_inputs():
        a = inputs[i.name]
        # dtype must match exactly
        want = {"tensor(float)": np.float32, "tensor(int64)": np.int64}[i.type]
        assert a.dtype == want, (i.name, a.dtype, i.type)
        assert len(a.shape) == len(i.shape), (i.name, a.shape, i.shape)
        for d_a, d_g in zip(a.shape, i.shape):
            assert not isinstance(d_g, int) or d_g == d_a, (i.name, a.shape, i.shape)
    out_names = [o.name for o in sess.get_outputs()]
    res = sess.run(out_names, {k: _c(v) for k, v in inputs.items()})
    outs = dict(zip(out_names, res))
    diffs = {}
    rel = {}
    for k, v in outs.items():
        ref = torch_outputs[k]
        assert ref.shape == v.shape, (k, ref.shape, v.shape)
        diffs[k] = float(np.max(np.abs(ref.astype(np.float64) - v.astype(np.float64))))
        rel[k] = diffs[k] / max(float(np.std(ref.astype(np.float64))), 1e-30)
    base = path.name[: -len(".onnx")]
    save_file({k: _c(v) for k, v in inputs.items()},
              str(path.parent / f"{base}.inputs.safetensors"))
    save_file({k: _c(v) for k, v in outs.items()},
              str(path.parent / f"{base}.outputs.safetensors"))
    ins, outs_desc, opset = graph_io(path)
    ops = op_histogram(path)
    ok = all(d < atol for d in diffs.values())
    print(f"[verify] {path.name}: check_model(full_check=True) OK; "
          f"onnxruntime vs PyTorch max|diff| = "
          + ", ".join(f"{k}: {d:.3e} ({rel[k]:.2e} of the output std)" for k, d in diffs.items())
          + f" -> {'PASS' if ok else 'FAIL'} (< {atol:g})")
    print(f"[verify]   inputs  {ins}")
    print(f"[verify]   outputs {outs_desc}")
    print(f"[verify]   opset {opset}; bytes {path.stat().st_size}"
          + "".join(f" + {f.name} {f.stat().st_size}" for f in sorted(path.parent.glob(path.name + ".data"))))
    print(f"[verify]   ops {ops}")
    flagged = [o for o in ops if o.split('::')[-1].replace('fn:', '') in
               ("If", "Loop", "Scan", "SequenceConstruct", "SequenceAt")]
    if flagged:
        print(f"[verify]   NOTE control-flow/sequence ops present: {flagged}")
    if not ok:
        raise SystemExit(f"{path.name}: onnxruntime/PyTorch mismatch {diffs}")
    return {"diffs": diffs, "diffs_rel_std": rel, "inputs": ins, "outputs": outs_desc, "opset": opset, "ops": ops}


def write_summary(name: str, info: dict) -> None:
    """Append/replace an entry in models/manifest.json (machine-readable: io, opset, ops, params...)."""
    p = HERE / "manifest.json"
    d = json.loads(p.read_text()) if p.exists() else {}
    d[name] = info
    p.write_text(json.dumps(d, indent=1, sort_keys=True))
