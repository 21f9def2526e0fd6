"""`trojan-gate benchmark WHICH`: heavy measured runs that print a table and log to MLflow."""
from __future__ import annotations

import importlib

HELP = "run a benchmark (strip, deepinspect, patch) and print its table"

BENCHMARKS = {
    "strip": "trojan_gate.pipelines.benchmark_strip",
    "deepinspect": "trojan_gate.pipelines.benchmark_deepinspect",
    "patch": "trojan_gate.pipelines.benchmark_patch",
}


def add_arguments(parser):
    sub = parser.add_subparsers(dest="benchmark", metavar="WHICH")
    for name, module_name in BENCHMARKS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                continue
            raise
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(_bench=module.run)


def run(args) -> int:
    if not getattr(args, "_bench", None):
        raise ValueError("choose a benchmark: " + ", ".join(BENCHMARKS))
    return args._bench(args)
