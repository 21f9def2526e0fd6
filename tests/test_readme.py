"""The README's Python API example runs as written."""
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def test_the_readme_python_api_example_runs(capsys):
    text = README.read_text()
    section = text.split("## Python API", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    exec(compile(code, "README.md (Python API)", "exec"), {"__name__": "readme_example"})
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("True [3]")  # the digits trojan's target is flagged


def test_the_readme_commands_are_what_ci_runs():
    text = README.read_text()
    ci = (README.parent / ".ci" / "run").read_text()
    test_cmd = next(line for line in text.splitlines() if "pytest" in line and line.startswith("python3 -m venv"))
    assert test_cmd in ci
    assert text.index("trojan-gate demo") < text.index("## What it catches")  # the two commands come first
    assert len(text.splitlines()) <= 300
