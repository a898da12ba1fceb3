"""Writing benchmark results: JSON for machines, CSV and a markdown table for people."""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any, Sequence

from gaprune.files import write_json_atomic, write_text_atomic

RESULTS = Path(__file__).resolve().parent / "results"


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
