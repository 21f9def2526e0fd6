"""The installed distribution: one namespace, entry points, and conda.yaml in step with pyproject."""
import importlib
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_three_folders_import_under_one_namespace():
    for pkg in ("gates", "plugins", "pipelines"):
        mod = importlib.import_module(f"trojan_gate.{pkg}")
        assert mod.__name__ == f"trojan_gate.{pkg}"
    assert "gates" not in sys.modules and "plugins" not in sys.modules and "pipelines" not in sys.modules


def test_console_script_and_evaluator_entry_points_are_declared():
    eps = md.entry_points()
    assert any(ep.name == "trojan-gate" and ep.value == "trojan_gate.pipelines.cli:main"
               for ep in eps.select(group="console_scripts"))
    assert any(ep.name == "trojan" for ep in eps.select(group="mlflow.model_evaluator"))


def _names(reqs):
    return {re.split(r"[<>=!~\[ ]", r.strip(), maxsplit=1)[0].lower(): r.strip() for r in reqs}


def test_conda_yaml_agrees_with_pyproject():
    tomllib = pytest.importorskip("tomllib")
    import yaml

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert _names(pip_deps) == _names(project["dependencies"])


def test_cli_lists_its_commands(capsys):
    from trojan_gate.pipelines.cli import main

    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("intake", "calibrate", "demo", "lab", "serve"):
        assert cmd in out


def test_every_command_help_renders():
    """argparse %-formats help strings; a bare '%' in one breaks --help for that command."""
    import argparse

    from trojan_gate.pipelines.cli import build_parser

    def walk(parser):
        parser.format_help()
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for child in action.choices.values():
                    yield from walk(child)
        yield parser.prog

    progs = list(walk(build_parser()))
    assert "trojan-gate benchmark patch" in progs and "trojan-gate gate" in progs
