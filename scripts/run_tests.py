#!/usr/bin/env python3
"""Runs every test binary of the workspace, several at a time (scripts/test.sh calls it).

`cargo test` runs its test binaries one after the other. Most of tfmqc's tests run the
compiler or a UNet on one core, and a binary whose last test is long (tests/quantize.rs'
every-model test, tests/conditional.rs' single test) leaves the second core idle meanwhile.
Running binaries side by side keeps both cores busy. This runner:

- builds the tests once (`cargo test --release --workspace --no-run`, cargo's JSON lists
  the executables), then starts `--jobs` binaries at a time, the longest first (durations
  of the last run from target/test-durations.json, else the order below), each in its
  package's directory with cargo's environment for tests, libtest's own thread count;
- prints each binary's whole output when it ends (never interleaved), then a table of
  wall and CPU seconds per binary, and the failures again at the end;
- runs the doc tests too (`cargo test --doc`), as one more job;
- exits 1 if anything failed, after running everything (like `--no-fail-fast`).

Arguments after `--` go to every test binary (e.g. `-- --nocapture`).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

# Used when no earlier run recorded durations (a fresh clone): the binaries that took the
# most CPU time in the last measured run (2026-12-01), most first; everything else follows.
SLOW_FIRST = [
    "quantize",
    "tib",
    "int8",
    "sampler",
    "conditional",
    "sd_tiny",
    "int4",
    "tcaq",
    "calib_files",
    "python_api",
    "sample",
    "tcr",
    "bench",
    "scale",
]


def cargo():
    return os.environ.get("CARGO") or shutil.which("cargo") or "cargo"


def test_executables(cargo_args):
    """(name, executable, package directory) of every test binary cargo builds."""
    cmd = [cargo(), "test", "--release", "--workspace", "--no-run",
           "--message-format=json-render-diagnostics", *cargo_args]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.exit(f"run_tests.py: building the tests failed ({' '.join(cmd)})")
    found = []
    for line in proc.stdout.splitlines():
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            continue
        if msg.get("reason") != "compiler-artifact" or not msg.get("executable"):
            continue
        if not msg.get("profile", {}).get("test"):
            continue
        target = msg["target"]
        pkg_dir = os.path.dirname(msg["manifest_path"])
        kind = target["kind"][0]
        if kind == "test":
            name = target["name"]
            label = f"{os.path.relpath(target['src_path'], os.getcwd())}"
        else:
            name = f"{os.path.basename(pkg_dir)}-{kind}"
            label = f"unittests {os.path.relpath(target['src_path'], os.getcwd())}"
        found.append({"name": name, "label": label, "exe": msg["executable"],
                      "dir": pkg_dir, "manifest": msg["manifest_path"]})
    return found


def order(jobs, durations):
    def key(job):
        if job["name"] in durations:
            return (0, -durations[job["name"]])
        if job["name"] in SLOW_FIRST:
            return (1, SLOW_FIRST.index(job["name"]))
        return (2, job["name"])
    return sorted(jobs, key=key)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 2,
                    help="test binaries run at once (default: the CPU count)")
    ap.add_argument("--durations", default="target/test-durations.json",
                    help="where the last run's wall seconds per binary are kept")
    ap.add_argument("libtest_args", nargs="*", help="after --: arguments for every binary")
    args = ap.parse_args()

    start = time.monotonic()
    jobs = test_executables([])
    built = time.monotonic()
    try:
        with open(args.durations) as f:
            durations = json.load(f)
    except (OSError, ValueError):
        durations = {}
    queue = order(jobs, durations)
    # The doc tests compile while they run; one job among the others.
    queue.append({"name": "doc-tests", "label": "doc tests (cargo test --doc)",
                  "cmd": [cargo(), "test", "--release", "--workspace", "--doc", "--",
                          *args.libtest_args], "dir": os.getcwd()})
    print(f"run_tests.py: {len(queue)} test binaries, {args.jobs} at a time "
          f"(built in {built - start:.0f} s)", flush=True)

    running = {}  # pid -> (job, started, log file)
    results = []
    logs = tempfile.mkdtemp(prefix="tfmqc-tests-")
    while queue or running:
        while queue and len(running) < args.jobs:
            job = queue.pop(0)
            env = dict(os.environ)
            env["CARGO"] = cargo()
            if "manifest" in job:
                env["CARGO_MANIFEST_DIR"] = job["dir"]
            cmd = job.get("cmd") or [job["exe"], *args.libtest_args]
            log = open(os.path.join(logs, job["name"] + ".log"), "w+")
            proc = subprocess.Popen(cmd, cwd=job["dir"], env=env, stdout=log,
                                    stderr=subprocess.STDOUT)
            running[proc.pid] = (job, time.monotonic(), log, proc)
        pid, status, usage = os.wait4(-1, 0)
        if pid not in running:
            continue
        job, started, log, proc = running.pop(pid)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        log.seek(0)
        output = log.read()
        log.close()
        ok = proc.returncode == 0
        print(f"\n──── {job['label']}: {'ok' if ok else 'FAILED'} in {wall:.1f} s "
              f"(CPU {usage.ru_utime + usage.ru_stime:.1f} s)", flush=True)
        sys.stdout.write(output)
        sys.stdout.flush()
        results.append((job, ok, wall, usage.ru_utime + usage.ru_stime, output))

    total = time.monotonic() - start
    print("\n──── summary (wall and CPU seconds per binary, longest first)")
    for job, ok, wall, cpu, _ in sorted(results, key=lambda r: -r[2]):
        print(f"  {wall:7.1f} {cpu:7.1f}  {'ok    ' if ok else 'FAILED'} {job['label']}")
    cpu_all = sum(r[3] for r in results)
    print(f"  {total:7.1f} {cpu_all:7.1f}  total (wall includes the build, "
          f"{built - start:.0f} s)")
    try:
        os.makedirs(os.path.dirname(args.durations) or ".", exist_ok=True)
        with open(args.durations, "w") as f:
            json.dump({r[0]["name"]: round(r[2], 1) for r in results}, f, indent=1)
    except OSError as e:
        print(f"run_tests.py: cannot record durations in {args.durations}: {e}")
    failed = [r for r in results if not r[1]]
    if failed:
        print("\n──── failed:")
        for job, _, _, _, output in failed:
            print(f"\n{job['label']}:\n{output[-20000:]}")
        print(f"run_tests.py: {len(failed)} of {len(results)} test binaries failed: "
              + ", ".join(r[0]["label"] for r in failed))
        return 1
    print(f"run_tests.py: all {len(results)} test binaries passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
