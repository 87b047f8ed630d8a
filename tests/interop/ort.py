"""onnxruntime and onnx.checker side of the interop tests.

Called by the Rust tests (tests/common/mod.rs) with the interpreter of target/pyenv:

    ort.py check MODEL...                       onnx.checker (full_check) on each file
    ort.py run MODEL INPUTS OUT                 run MODEL on INPUTS (safetensors), save outputs
    ort.py sweep MODEL INPUTS TINPUT STEPS OUT  run once per time step (comma list), replacing
                                                TINPUT in INPUTS; outputs stacked on a new axis 0
    ort.py runmany MODEL RECORDS OUT            run once per record of RECORDS (keys NNNNN/<input>);
                                                outputs keyed NNNNN/<output>
    ort.py expect-error MODEL INPUTS            exit 0 only if running MODEL raises
    ort.py fused MODEL INPUTS OUT OPT           run MODEL on INPUTS twice: with onnxruntime's graph
                                                optimizations (its int8 kernels where it fuses QDQ),
                                                saving OUT and the optimized graph as OPT, and with
                                                them off (an exact float simulation of the QDQ
                                                graph), saving OUT with ".sim" before its suffix;
                                                prints the optimized graph's op counts as JSON

Outputs are written as safetensors keyed by output name, so the Rust side compares bit
patterns, not printed numbers.
"""

import sys

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file, save_file


def session(path):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])


def feed(sess, inputs):
    names = [i.name for i in sess.get_inputs()]
    missing = [n for n in names if n not in inputs]
    if missing:
        sys.exit(f"inputs file lacks {missing}")
    return {n: inputs[n] for n in names}


def cmd_check(paths):
    for p in paths:
        onnx.checker.check_model(p, full_check=True)
    print("ok")


def cmd_run(model, inputs, out):
    sess = session(model)
    outs = sess.run(None, feed(sess, load_file(inputs)))
    save_file({o.name: np.ascontiguousarray(v) for o, v in zip(sess.get_outputs(), outs)}, out)


def cmd_sweep(model, inputs, tinput, steps, out):
    sess = session(model)
    base = feed(sess, load_file(inputs))
    template = base[tinput]
    results = {o.name: [] for o in sess.get_outputs()}
    for s in [int(v) for v in steps.split(",")]:
        x = dict(base)
        x[tinput] = np.full(template.shape, s, dtype=template.dtype)
        for o, v in zip(sess.get_outputs(), sess.run(None, x)):
            results[o.name].append(v)
    save_file({k: np.ascontiguousarray(np.stack(v)) for k, v in results.items()}, out)


def cmd_runmany(model, records, out):
    sess = session(model)
    recs = {}
    for key, value in load_file(records).items():
        rec, name = key.split("/", 1)
        recs.setdefault(rec, {})[name] = value
    results = {}
    for rec in sorted(recs):
        for o, v in zip(sess.get_outputs(), sess.run(None, feed(sess, recs[rec]))):
            results[f"{rec}/{o.name}"] = np.ascontiguousarray(v)
    save_file(results, out)


def cmd_expect_error(model, inputs):
    sess = session(model)
    try:
        sess.run(None, feed(sess, load_file(inputs)))
    except Exception as e:  # noqa: BLE001 - any runtime error is what we want
        print(f"error as expected: {str(e).splitlines()[0][:200]}")
        return
    sys.exit("the model ran without error")


def cmd_fused(model, inputs, out, opt):
    import collections
    import json
    given = load_file(inputs)
    for mode, path in (("kernel", out), ("sim", out.replace(".safetensors", ".sim.safetensors"))):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        if mode == "kernel":
            opts.optimized_model_filepath = opt
        else:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        outs = sess.run(None, feed(sess, given))
        save_file({o.name: np.ascontiguousarray(v) for o, v in zip(sess.get_outputs(), outs)}, path)
    ops = collections.Counter(n.op_type for n in onnx.load(opt).graph.node)
    print(json.dumps(dict(sorted(ops.items()))))


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"check": lambda: cmd_check(args),
     "run": lambda: cmd_run(*args),
     "fused": lambda: cmd_fused(*args),
     "sweep": lambda: cmd_sweep(*args),
     "runmany": lambda: cmd_runmany(*args),
     "expect-error": lambda: cmd_expect_error(*args)}[cmd]()
