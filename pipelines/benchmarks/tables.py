"""Where a benchmark's table goes: printed, and written to `--out` when given."""
from __future__ import annotations

from pathlib import Path


def publish(text: str, out: str | None) -> None:
    """Print the markdown table and, with `out`, write it there (folders created)."""
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
