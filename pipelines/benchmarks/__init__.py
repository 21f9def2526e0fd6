"""`trojan-gate benchmark WHICH`: heavy measured runs that print a table, log to MLflow, and write `--out`."""
from __future__ import annotations

import importlib

HELP = "run a benchmark (strip, strip-paper, deepinspect, detection, patch, hostile, throughput) and print its table"

BENCHMARKS = {
    "strip": "trojan_gate.pipelines.benchmarks.runtime",
    "strip-paper": "trojan_gate.pipelines.benchmarks.strip",
    "deepinspect": "trojan_gate.pipelines.benchmarks.deepinspect",
    "detection": "trojan_gate.pipelines.benchmarks.detection",
    "patch": "trojan_gate.pipelines.benchmarks.patch",
    "hostile": "trojan_gate.pipelines.benchmarks.hostile",
    "throughput": "trojan_gate.pipelines.benchmarks.throughput",
}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="benchmark", metavar="WHICH")
    for name, module_name in BENCHMARKS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(bench=module.run)


def run(args) -> int:
    if not getattr(args, "bench", None):
        raise ValueError("choose a benchmark: " + ", ".join(BENCHMARKS))
    return args.bench(args)
