"""Writing benchmark results: JSON for machines, CSV and a markdown table for people."""
from __future__ import annotations

import csv
import io
import os
import tempfile
from pathlib import Path
from typing import Any, Sequence

from chromosomes import write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(handle, "w") as stream:
        stream.write(text)
    os.replace(temporary, path)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.2f}" if isinstance(value, float) else "" if value is None else str(value)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def save_results(stem: str, data: dict[str, Any], rows: Sequence[dict[str, Any]], columns: Sequence[str],
                 folder: Path = RESULTS) -> Path:
    """<folder>/<stem>.json (everything), <stem>.csv and <stem>.md (the table); folder: results/."""
    write_json_atomic(folder / f"{stem}.json", data)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(folder / f"{stem}.csv", buffer.getvalue())
    write_text_atomic(folder / f"{stem}.md", markdown_table(rows, columns))
    return folder / f"{stem}.json"
