"""Parquet reads that name the file when it is damaged (truncated, empty, not parquet at all)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@contextmanager
def naming_the_file(path: str | Path) -> Iterator[None]:
    """Turn pyarrow's error for a damaged file into a one-line error that says which file."""
    try:
        yield
    except (OSError, pa.ArrowException) as err:
        size = Path(path).stat().st_size if Path(path).is_file() else None
        raise ValueError(f"parquet file {path} is unreadable ({size} bytes; corrupt, truncated or empty): {err}") from err


def parquet_file(path: str | Path) -> pq.ParquetFile:
    with naming_the_file(path):
        return pq.ParquetFile(path)


def read_table(path: str | Path, columns: list[str] | None = None) -> pa.Table:
    with naming_the_file(path):
        return pq.read_table(path, columns=columns)


def read_row_group(path: str | Path, group: int, columns: list[str]) -> pa.Table:
    with naming_the_file(path):
        parquet = pq.ParquetFile(path)
        return parquet.read_row_group(group, columns=[c for c in columns if c in parquet.schema_arrow.names])
