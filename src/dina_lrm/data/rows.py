"""Rows of a CSV, JSONL or JSON file: what dataset readers and ``dina-lrm score --pairs`` read.
Needs nothing beyond the standard library, so the core install can read them."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def read_rows(path: Path, what: str = "file") -> list[dict]:
    """The rows of a CSV (with a header), JSONL or JSON-list file, as dicts; ``what`` names the file in errors."""
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.suffix == ".csv":
        with path.open(newline="") as handle:
            return list(csv.DictReader(handle))
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}, line {number}: not JSON ({err})") from err
        return rows
    try:
        rows = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(rows, list):
        raise ValueError(f"{path} must hold a JSON list of rows")
    return rows
