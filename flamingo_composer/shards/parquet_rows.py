"""Rows of a parquet file, a bounded batch at a time (`ParquetFile.iter_batches`, never a whole file); a file that
cannot be opened or breaks part way is counted and named, and the rows read before the damage are kept."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from flamingo_composer.shards.convert import ConversionReport

BATCH_ROWS = 256  # rows per read: with images of ~100 KB, ~25 MB in memory at a time


def read_schema(path: str | Path, report: ConversionReport) -> pa.Schema | None:
    """The file's schema (its footer only), or None when the file is not readable parquet (counted)."""
    try:
        return pq.read_schema(path)
    except (OSError, pa.ArrowException) as err:
        report.skip("unreadable_parquet", f"{path}: {type(err).__name__}: {err}")
        return None


def iter_parquet_rows(
    path: str | Path, columns: list[str], report: ConversionReport, *, batch_rows: int = BATCH_ROWS
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(0-based row number, {column: value}) for every readable row, reading only `columns`, one row group at a
    time: a damaged row group is counted (`corrupt_parquet`) and the next ones are still read."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        report.skip("unreadable_parquet", f"{path}: {type(err).__name__}: {err}")
        return
    start = 0
    for group in range(parquet.num_row_groups):
        size = parquet.metadata.row_group(group).num_rows
        row = start
        try:
            for batch in parquet.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
                for values in batch.to_pylist():
                    yield row, values
                    row += 1
        except (OSError, pa.ArrowException) as err:
            report.skip(
                "corrupt_parquet",
                f"{path} row group {group} (rows {start}-{start + size - 1}): {type(err).__name__}: {err} "
                f"({row - start} of its rows before the damage were kept)",
            )
        start += size
