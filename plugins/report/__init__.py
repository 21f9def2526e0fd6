"""The report of a scan or a gate: one JSON format (ModelScan-like) and one self-contained HTML page."""
from .document import FORMAT, FORMAT_VERSION, VERDICTS, build_report, jsonable
from .html import render_html
from .writer import write_report

__all__ = ["FORMAT", "FORMAT_VERSION", "VERDICTS", "build_report", "jsonable", "render_html", "write_report"]
