#!/usr/bin/env python3
"""What an ONNX file spends on its graph: names and value_info, beside its size.

    python scripts/graph_bytes.py FLOAT.onnx FILE.onnx [FILE.onnx ...] [--ort]
    python scripts/graph_bytes.py FLOAT.onnx FILE.onnx --before DUMP_DIR

One line per FILE: its bytes (with an external data file), the ratio to FLOAT, the
protobuf bytes of every name (node names, node inputs and outputs, initializer and graph
input/output names; each string with its tag and length), the bytes of `value_info`, the
node count and the longest name. `--ort`: also load each file in onnxruntime (graph
optimizations on) and say whether it loaded.

`--before DUMP_DIR` (the compile's `--dump-dir`): also what the same file weighed before
the short names and without value_info dropped, the way earlier versions wrote it: each
name the `NN-names.txt` map renamed at its long length (a node named after its output
takes that output's long name), and a `value_info` entry for every typed value the IR
before the renaming prints (`name: f32[N,4,16,16] = ...`; the graph outputs excepted).

Needs the `onnx` package (and `onnxruntime` for --ort): /work/main/target/pyenv/bin/python.
"""

import os
import sys

import onnx


def varint_len(n):
    size = 1
    while n >= 0x80:
        n >>= 7
        size += 1
    return size


def string_bytes(s):
    b = len(s.encode())
    return 1 + varint_len(b) + b


def file_bytes(path):
    total = os.path.getsize(path)
    data = path + ".data"
    if os.path.exists(data):
        total += os.path.getsize(data)
    return total


def graph_bytes(path):
    m = onnx.load(path, load_external_data=False)
    g = m.graph
    names = 0
    longest = ""
    every = []
    for n in g.node:
        every.append(n.name)
        every.extend(n.input)
        every.extend(n.output)
    every.extend(t.name for t in g.initializer)
    every.extend(v.name for v in g.input)
    every.extend(v.name for v in g.output)
    for s in every:
        names += string_bytes(s)
        if len(s) > len(longest):
            longest = s
    vi = sum(1 + varint_len(v.ByteSize()) + v.ByteSize() for v in g.value_info)
    return {
        "bytes": file_bytes(path),
        "names": names,
        "value_info": vi,
        "nodes": len(g.node),
        "longest": longest,
    }


def before_renaming(path, dump_dir):
    """(name bytes, value_info bytes) the file had before the renaming (see --before)."""
    files = sorted(f for f in os.listdir(dump_dir) if f.endswith(".txt"))
    names_file = [f for f in files if f.endswith("-names.txt")][-1]
    step = int(names_file.split("-")[0])
    ir_file = [f for f in files if int(f.split("-")[0]) == step - 1 and f.count(".") == 1][0]
    long_of = {}
    for line in open(os.path.join(dump_dir, names_file), encoding="utf-8"):
        short, _, long = line.rstrip("\n").partition(" ← ")
        long_of[short] = long
    m = onnx.load(path, load_external_data=False)
    g = m.graph
    every = []
    for n in g.node:
        every.append(n.name)
        every.extend(n.input)
        every.extend(n.output)
    every.extend(t.name for t in g.initializer)
    every.extend(v.name for v in g.input)
    every.extend(v.name for v in g.output)
    names = sum(string_bytes(long_of.get(s, s)) for s in every)
    outputs = {v.name for v in g.output}
    elem = {"f32": 1, "u8": 2, "i8": 3, "i32": 6, "i64": 7, "bool": 9, "f16": 10}
    vi = 0
    for line in open(os.path.join(dump_dir, ir_file), encoding="utf-8"):
        if not line.startswith("  ") or " = " not in line or ": " not in line:
            continue
        head = line.strip().split(" = ")[0]
        name, _, ty = head.rpartition(": ")
        if ty == "?" or name in outputs or "[" not in ty:
            continue
        dt, _, dims = ty.partition("[")
        if dt not in elem:
            continue
        shape = 0
        for d in [d for d in dims.rstrip("]").split(",") if d]:
            if d.lstrip("-").isdigit():
                dim = 1 + varint_len(int(d))
            elif d == "?":
                dim = 0
            else:
                dim = string_bytes(d)
            shape += 1 + varint_len(dim) + dim
        tensor = 2 + (1 + varint_len(shape) + shape)
        typ = 1 + varint_len(tensor) + tensor
        entry = string_bytes(name) + 1 + varint_len(typ) + typ
        vi += 1 + varint_len(entry) + entry
    return names, vi


def loads_in_onnxruntime(path):
    import onnxruntime as ort

    try:
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return "yes"
    except Exception as e:  # report, do not stop: the table names the file
        return f"no: {str(e)[:80]}"


def main(argv):
    before = None
    if "--before" in argv:
        i = argv.index("--before")
        before = argv[i + 1]
        argv = argv[:i] + argv[i + 2:]
    args = [a for a in argv if not a.startswith("--")]
    ort = "--ort" in argv
    if len(args) < 2:
        print(__doc__)
        return 2
    float_bytes = file_bytes(args[0])
    extra = " before: bytes | / float | name bytes | value_info bytes |" if before else ""
    print("| file | bytes | / float | name bytes | value_info bytes | nodes | longest name |"
          + extra + (" onnxruntime |" if ort else ""))
    print("| --- | --- | --- | --- | --- | --- | --- |" + (" --- |" * 4 if before else "")
          + (" --- |" if ort else ""))
    for path in args[1:]:
        r = graph_bytes(path)
        line = (f"| {os.path.basename(path)} | {r['bytes']} | {r['bytes'] / float_bytes:.3f} "
                f"| {r['names']} | {r['value_info']} | {r['nodes']} | `{r['longest'][:40]}` |")
        if before:
            names, vi = before_renaming(path, before)
            b = r["bytes"] + (names - r["names"]) + (vi - r["value_info"])
            line += f" {b} | {b / float_bytes:.3f} | {names} | {vi} |"
        if ort:
            line += f" {loads_in_onnxruntime(path)} |"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
