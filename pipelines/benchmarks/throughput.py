"""`trojan-gate benchmark throughput`: the guarded path on every path a user meets, against plain inference.

One model, its two run-time checks (STRIP at N = 10 and the default run-time check, calibrated on
`--heldout` once and kept under `--artifacts`), and `--n` inputs (the `--inputs` images tiled):

- **in process, batch 256**: inputs/s of plain ONNX Runtime (one session, the model alone, 256 rows
  per call), of the STRIP guard and of the check guard (`GuardedClassifier.predict` on 256 inputs
  at a time), median of `--repeats` interleaved rounds;
- **CLI end to end**: `trojan-gate check` on the n inputs in a fresh process (start-up, reading,
  checks, writing included), its wall time, peak resident memory (`wait4`), the inputs it flagged,
  and whether the flags equal those of the numpy copies (`KeyedCopies(in_graph=False)`) computed
  in process; plus the start-up: `check` on 100 inputs (wall time and memory of the command alone,
  measured by a small parent process);
- **REST** (`--rest`, see `rest`): `mlflow models serve` of the guarded model and of the plain ONNX
  model, one client on loopback, p50/p99 latency and inputs/s at each `--rest-rows`.

The bound a guard is measured against: the model work it costs per input is `calls` = the served
model's inputs (the input and its copies) + the reference classifier's, so its throughput can be
at most plain / calls; the table gives guarded / (plain / calls).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .tables import publish
from .timing import interleaved_medians

HELP = "guarded throughput and memory in process, through the CLI and over REST, against plain inference"
KINDS = ("strip", "runtime")


def add_arguments(p):
    p.add_argument("--model", required=True, help="ONNX classifier")
    p.add_argument("--heldout", required=True, help="labelled held-out .npz (x, y) the checks are calibrated on")
    p.add_argument("--inputs", required=True, help=".npz of images (key x) tiled to --n inputs")
    p.add_argument("--artifacts", required=True, help="folder keeping the calibrated checks (reused when present)")
    p.add_argument("--n", type=int, default=100_000, help="inputs of the CLI run (default 100000)")
    p.add_argument("--batch", type=int, default=256, help="inputs per call in process (default 256)")
    p.add_argument("--in-process-n", type=int, default=10_000, help="inputs of each in-process round")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rest", action="store_true", help="also serve both models with `mlflow models serve`")
    p.add_argument("--rest-rows", default="1,100,1000", help="rows per request of the REST runs")
    p.add_argument("--rest-seconds", type=float, default=20.0, help="seconds of requests per REST row count")
    p.add_argument("--out", default=None, help="also write the markdown here")


def checks(model: Path, heldout: Path, folder: Path) -> dict:
    """{kind: artifact directory}, calibrating (seed 0, FRR 1%) the ones `folder` does not hold yet."""
    from trojan_gate.gates.data import load_heldout
    from trojan_gate.gates.oracle import ModelOracle
    from trojan_gate.gates.runtime import calibrate_check, check_kind

    out = {}
    for kind in KINDS:
        directory = folder / kind
        if not directory.is_dir() or check_kind(directory) != kind:
            print(f"calibrating the {kind} check on {heldout} ...", flush=True)
            det = calibrate_check(ModelOracle(model), load_heldout(heldout), kind=kind)
            det.save(directory)
        out[kind] = directory
    return out


def tiled(path: Path, n: int) -> np.ndarray:
    from trojan_gate.pipelines.array_stream import InputStream

    with InputStream(path) as s:
        x = np.concatenate(list(s.chunks(len(s))))
    return np.ascontiguousarray(np.resize(x, (n,) + x.shape[1:]))


def plain_runner(model: Path, x: np.ndarray, batch: int):
    """Plain inference: one ONNX Runtime session on the model alone, `batch` rows per call."""
    import onnxruntime as ort

    from trojan_gate.gates.model_file import default_providers

    session = ort.InferenceSession(str(model), providers=default_providers())
    name = session.get_inputs()[0].name

    def run():
        for s in range(0, len(x), batch):
            session.run(None, {name: x[s:s + batch]})
    return run


def in_process(model: Path, artifacts: dict, x: np.ndarray, batch: int, repeats: int) -> dict:
    """Inputs/s of plain inference and of each guard at `batch` inputs per call (median of interleaved rounds),
    with each guard's mean calls per input."""
    from trojan_gate.gates.guard import GuardedClassifier

    guards = {kind: GuardedClassifier.from_artifacts(model, d, chunk_size=batch) for kind, d in artifacts.items()}
    runners = {"plain": plain_runner(model, x, batch)}
    calls = {"plain": 1.0}
    for kind, guard in guards.items():
        runners[kind] = (lambda g: lambda: g.predict(x))(guard)
        first = guard.predict(x[:2000])  # warm-up, and the calls a clean input costs
        calls[kind] = float(np.mean(first["model_calls"] + first["reference_calls"]))
    runners["plain"]()
    seconds = interleaved_medians(runners, repeats)
    return {k: {"inputs_per_s": len(x) / s, "calls": calls[k]} for k, s in seconds.items()}


# A small parent for the timed command: a child forked from this (large) benchmark process would count
# the parent's pages in its peak RSS; forked from this wrapper, the peak is the command's own.
_WRAPPER = ("import json, resource, subprocess, sys, time; t0 = time.perf_counter(); rc = subprocess.call(sys.argv[1:]); "
            "print(json.dumps({'seconds': time.perf_counter() - t0, "
            "'peak_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}), file=sys.stderr); sys.exit(rc)")


def run_cli(args: list[str]) -> dict:
    """Run `trojan-gate ARGS` in a fresh process: wall seconds, peak resident memory (MiB), exit code and its
    JSON summary line."""
    proc = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable, "-m", "trojan_gate.pipelines.cli", *args],
                          capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"trojan-gate {args[0]} failed ({proc.returncode}): {proc.stderr[-800:]}")
    measured = json.loads(proc.stderr.strip().splitlines()[-1])
    return {"seconds": measured["seconds"], "rc": proc.returncode, "peak_mib": measured["peak_kib"] / 1024.0,
            "summary": json.loads(proc.stdout.strip().splitlines()[-1])}


def numpy_flags(model: Path, directory: Path, x: np.ndarray) -> np.ndarray:
    """The flags the check gives with its copies built in numpy (the path before the wrapper graph)."""
    from trojan_gate.gates.guard import GuardedClassifier

    guard = GuardedClassifier.from_artifacts(model, directory)
    guard.detector.copies_.in_graph = False
    return guard.predict(x)["is_trojaned"]


def end_to_end(model: Path, artifacts: dict, x: np.ndarray, work: Path, repeats: int) -> dict:
    """`trojan-gate check` on all of x and on its first 100 inputs, per check (median wall time of `repeats`)."""
    np.savez(work / "inputs.npz", x=x)
    np.savez(work / "start.npz", x=x[:100])
    rows = {}
    for kind, directory in artifacts.items():
        common = [str(model), "--boundary", str(directory), "--out"]
        runs = [run_cli(["check", *common, str(work / f"{kind}.npz"), "--inputs", str(work / "inputs.npz")])
                for _ in range(repeats)]
        starts = [run_cli(["check", *common, str(work / "s.npz"), "--inputs", str(work / "start.npz")])
                  for _ in range(repeats)]
        flags = np.load(work / f"{kind}.npz")["is_trojaned"]
        rows[kind] = {"seconds": float(np.median([r["seconds"] for r in runs])),
                      "peak_mib": max(r["peak_mib"] for r in runs), "flagged": int(flags.sum()),
                      "calls": runs[0]["summary"]["model_calls_per_input"]
                      + runs[0]["summary"]["reference_calls_per_input"],
                      "same_flags": bool(np.array_equal(flags, numpy_flags(model, directory, x))),
                      "start_seconds": float(np.median([r["seconds"] for r in starts]))}
    plain = plain_runner(model, x, 256)
    plain()
    rows["plain"] = {"seconds": float(np.median([_timed(plain) for _ in range(repeats)]))}
    return rows


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def markdown(args, speed: dict, e2e: dict, rest: list | None) -> str:
    from trojan_gate.gates import __version__

    lines = ["# The guarded path at its compute bound", "",
             f"Command: `trojan-gate benchmark throughput --model {args.model} --heldout {args.heldout} --inputs "
             f"{args.inputs} --artifacts {args.artifacts} --n {args.n}{' --rest' if args.rest else ''}` "
             f"({time.strftime('%Y-%m-%d')}, trojan-gate {__version__}, {os.cpu_count()} CPU cores). "
             "calls = the model work per clean input (the served model's inputs + the reference classifier's); "
             "bound = plain / calls.", "",
             f"In process, {args.batch} inputs per call, {args.in_process_n} inputs, median of {args.repeats} "
             "interleaved rounds:", "",
             "| path | inputs/s | calls per input | x bound |", "|---|---|---|---|"]
    plain = speed["plain"]["inputs_per_s"]
    for kind, r in speed.items():
        lines.append(f"| {kind} | {r['inputs_per_s']:.0f} | {r['calls']:.2f} | "
                     f"{r['inputs_per_s'] / (plain / r['calls']):.2f} |")
    p = e2e["plain"]["seconds"]
    lines += ["", f"CLI end to end (`trojan-gate check`, a fresh process: start-up, reading, checks and writing), "
              f"{args.n} inputs, median of {args.repeats}; plain = ONNX Runtime at batch 256 on the same rows in "
              f"this run: {p:.2f} s.", "",
              "| check | seconds | inputs/s | calls per input | x bound | peak memory | flagged | flags = numpy copies "
              "| start-up (100 inputs) |", "|---|---|---|---|---|---|---|---|---|"]
    for kind in KINDS:
        r = e2e[kind]
        bound = p * r["calls"]
        lines.append(f"| {kind} | {r['seconds']:.2f} | {args.n / r['seconds']:.0f} | {r['calls']:.2f} | "
                     f"{bound / r['seconds']:.2f} | {r['peak_mib']:.0f} MiB | {r['flagged']} | "
                     f"{'yes' if r['same_flags'] else 'NO'} | {r['start_seconds']:.2f} s |")
    if rest:
        from .rest import rest_markdown

        lines += ["", *rest_markdown(rest)]
    return "\n".join(lines) + "\n"


def run(args) -> int:
    model, artifacts_dir = Path(args.model), Path(args.artifacts)
    artifacts = checks(model, Path(args.heldout), artifacts_dir)
    x = tiled(Path(args.inputs), args.n)
    speed = in_process(model, artifacts, x[:args.in_process_n], args.batch, args.repeats)
    print(json.dumps(speed), flush=True)
    with tempfile.TemporaryDirectory(prefix="trojan-gate-throughput-") as tmp:
        e2e = end_to_end(model, artifacts, x, Path(tmp), args.repeats)
    print(json.dumps(e2e), flush=True)
    rest = None
    if args.rest:
        from .rest import rest_benchmark

        rest = rest_benchmark(model, artifacts, x, [int(v) for v in args.rest_rows.split(",")], args.rest_seconds)
    text = markdown(args, speed, e2e, rest)
    publish(text, args.out)
    return 0
