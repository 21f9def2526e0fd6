"""`trojan-gate` command line: one entry point, one module per sub-command.

Each sub-command module exposes `HELP` (one line), `add_arguments(parser)` and
`run(args) -> int`. Exit codes follow ModelScan's habit so CI can branch on them:
0 pass/clean, 1 flagged/blocked, 2 error.

Only the sub-command being run is imported (a fast start: `check`, `serve` and `promote` never
import torch); the top-level help imports them all to show each one's line.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback

EXIT_OK, EXIT_FLAGGED, EXIT_ERROR = 0, 1, 2

SUBCOMMANDS = {
    "intake": "trojan_gate.pipelines.intake",
    "calibrate": "trojan_gate.pipelines.calibrate",
    "check": "trojan_gate.pipelines.check",
    "calibrate-scan": "trojan_gate.pipelines.calibrate_scan",
    "scan": "trojan_gate.pipelines.scan",
    "gate": "trojan_gate.pipelines.gate",
    "promote": "trojan_gate.pipelines.promote",
    "serve": "trojan_gate.pipelines.serve",
    "lab": "trojan_gate.pipelines.lab",
    "demo": "trojan_gate.pipelines.demo",
    "keygen": "trojan_gate.pipelines.keygen",
    "listen": "trojan_gate.pipelines.listen",
    "watch": "trojan_gate.pipelines.watch",
    "webhook": "trojan_gate.pipelines.webhook",
    "server": "trojan_gate.pipelines.server",
    "benchmark": "trojan_gate.pipelines.benchmarks",
}


def _command(argv) -> str | None:
    """The sub-command named on the command line (the first argument that is not an option)."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with `only` (a sub-command's name), only that sub-command's module is imported
    and the others are listed without their arguments."""
    from trojan_gate.gates import __version__

    parser = argparse.ArgumentParser(prog="trojan-gate", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"trojan-gate {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module_name in SUBCOMMANDS.items():
        if only in SUBCOMMANDS and name != only:
            sub.add_parser(name)
            continue
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(p)
        p.set_defaults(handler=module.run)
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(only=_command(argv))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_ERROR
    try:
        return int(args.handler(args))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # fail closed: every unexpected error is exit 2 with the cause
        if args.verbose:
            traceback.print_exc()
        print(f"trojan-gate {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
