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


def test_the_public_api_imports_from_one_place():
    from trojan_gate.gates import DeepInspect, GuardedClassifier, ModelOracle, Patcher, Strip  # noqa: F401
    import trojan_gate.gates as api

    for name in api.__all__:
        assert getattr(api, name) is not None, name


PRODUCT = ("gates", "plugins", "pipelines")


def _modules():
    for folder in PRODUCT:
        yield from sorted((ROOT / folder).rglob("*.py"))


def test_no_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _modules() if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}


def test_no_module_reaches_into_another_objects_private_names():
    """`x._name` is only for `self` and `cls`; `from m import _name` never."""
    import ast

    found = []
    for path in _modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {ast.unparse(node)}")
            if isinstance(node, ast.ImportFrom):
                found += [f"{path.relative_to(ROOT)}:{node.lineno} import {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert found == []


def test_the_package_holds_no_experiment_script():
    """One-off experiment scripts live in git history (docs/experiments.md), not in the product."""
    tomllib = pytest.importorskip("tomllib")
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert all(p.startswith("trojan_gate.") for p in packages)
    assert not list((ROOT / "benchmarks").glob("*.py")), "benchmark tables only; scripts belong in git history"
    for folder in PRODUCT:  # every package on disk ships, and nothing else does
        for init in (ROOT / folder).rglob("__init__.py"):
            assert "trojan_gate." + ".".join(init.parent.relative_to(ROOT).parts) in packages, init


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return "trojan_gate." + ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, known: set) -> set:
    """The project modules `path` imports anywhere (top level or inside functions)."""
    import ast

    me, is_pkg = _module_name(path), path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = me.split(".") if is_pkg else me.split(".")[:-1]
                base = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            for a in node.names:
                out |= {base + "." + a.name} & known or {base} & known
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names} & known
    return out - {me}


def test_no_import_circle_among_the_projects_modules():
    """Tarjan's strongly connected components over every import, lazy ones included: none larger than one."""
    paths = [p for p in _modules() if p.suffix == ".py"]
    known = {_module_name(p) for p in paths}
    graph = {_module_name(p): _imports(p, known) for p in paths}
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert graph["trojan_gate.gates.guard"] >= {"trojan_gate.gates.runtime"}  # the checker sees lazy imports
    assert circles == []


def test_every_public_gates_definition_has_a_docstring():
    """Module-level functions and classes of `gates`, and the public methods of those classes."""
    import ast

    missing = []
    for path in sorted((ROOT / "gates").rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                continue
            members = [m for m in node.body if isinstance(m, ast.FunctionDef) and not m.name.startswith("_")] \
                if isinstance(node, ast.ClassDef) else []
            missing += [f"{path.relative_to(ROOT)}:{d.lineno} {d.name}" for d in [node, *members]
                        if not ast.get_docstring(d)]
    assert missing == []


def test_serving_paths_start_without_torch():
    """`check`, `serve`, `promote` and the guarded model import only what they use: no torch."""
    import subprocess
    import sys

    code = ("import sys; from trojan_gate.pipelines.cli import build_parser\n"
            "for c in ('check', 'serve', 'promote'): build_parser(c)\n"
            "import trojan_gate.pipelines.check, trojan_gate.pipelines.serve, trojan_gate.pipelines.promote\n"
            "import trojan_gate.plugins.serving, trojan_gate.plugins.promotion, trojan_gate.plugins.guarded_pyfunc\n"
            "import trojan_gate.gates.guard, trojan_gate.gates.runtime, trojan_gate.gates.strip.detector\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'onnx2torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
