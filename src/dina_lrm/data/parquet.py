"""Parquet reads that name the file when it is damaged (truncated, empty, not parquet at all)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
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


class RowReader:
    """Rows of several parquet files by (file, row), reading whole row groups and keeping the last
    ``keep`` in memory: a pass that goes file by file reads each row group once."""

    def __init__(self, paths: list[Path], columns: list[str], keep: int = 2):
        self.paths, self.columns, self.keep = list(paths), list(columns), keep
        self.group_starts = []
        for path in self.paths:
            metadata = parquet_file(path).metadata
            sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            self.group_starts.append(np.cumsum([0] + sizes[:-1]))
        self._cache: OrderedDict[tuple[int, int], dict] = OrderedDict()

    def row(self, file: int, row: int) -> dict:
        """Column name -> value of row ``row`` of file ``file``."""
        group = int(np.searchsorted(self.group_starts[file], row, side="right") - 1)
        key = (file, group)
        if key not in self._cache:
            self._cache[key] = read_row_group(self.paths[file], group, self.columns).to_pydict()
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
        offset = row - int(self.group_starts[file][group])
        return {name: values[offset] for name, values in self._cache[key].items()}
