"""Write a report: the JSON document (`document.build_report`) and its HTML page (`html.render_html`)."""
from __future__ import annotations

import json
from pathlib import Path

from .document import build_report
from .html import render_html


def write_report(directory, *, kind: str, model_name, version, verdict, scan, check=None, patch=None, errors=(),
                 meta=None, basename: str = "trojan_report", decision=None) -> tuple[Path, Path]:
    """Build, render and write `<basename>.json` and `<basename>.html` into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rep = build_report(kind=kind, model_name=model_name, version=version, verdict=verdict, scan=scan, check=check,
                       patch=patch, errors=errors, meta=meta, decision=decision)
    json_path = directory / f"{basename}.json"
    html_path = directory / f"{basename}.html"
    json_path.write_text(json.dumps(rep, indent=2, allow_nan=False))
    html_path.write_text(render_html(rep, scan=scan, check=check, decision=decision), encoding="utf-8")
    return json_path, html_path
