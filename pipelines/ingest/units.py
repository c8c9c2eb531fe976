"""A planned image collection held compactly: one row of a few integers per read unit.

A *read unit* is the smallest piece one read fetches: a Parquet row group, a WebDataset tar, or
a single image file. A collection of a billion images in our default shards has ~4M units, so
units live in numpy arrays (~24 bytes each) and file paths in one Arrow string array, never in a
Python object per unit; the whole table goes to the object store once and readers look up the
units they read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import pyarrow as pa

UnitKind = Literal["parquet", "tar", "files"]


@dataclass(frozen=True)
class ColumnNames:
    """Parquet column names; ``None`` means detect (see ``pipelines.ingest.planning``)."""

    image: str | None = None
    label: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class UnitTable:
    """Read units as parallel arrays (row ``i`` is unit ``i``).

    Attributes:
        kind: ``parquet`` (unit = row group), ``tar`` (unit = tar) or ``files`` (unit = one image file).
        paths: the files the units point into (Parquet files, tars, or image files).
        path_index: int32, the unit's file in ``paths``.
        row_group: int32, the Parquet row group (0 for other kinds).
        num_rows: int64, images in the unit, -1 when unknown before reading (tars).
        first_index: int64, dataset index of the unit's first image, -1 when unknown.
        label: int64, the label of a ``files`` unit (-1: none); empty for other kinds.
    """

    kind: UnitKind
    paths: pa.Array
    path_index: np.ndarray
    row_group: np.ndarray
    num_rows: np.ndarray
    first_index: np.ndarray
    label: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.path_index)

    @property
    def nbytes(self) -> int:
        arrays = (self.path_index, self.row_group, self.num_rows, self.first_index, self.label)
        return sum(array.nbytes for array in arrays) + self.paths.nbytes

    def path(self, unit: int) -> str:
        return self.paths[int(self.path_index[unit])].as_py()

    def select(self, units: np.ndarray | slice) -> UnitTable:
        """The units at ``units`` (indices or a slice), sharing ``paths``."""
        return replace(
            self,
            path_index=self.path_index[units],
            row_group=self.row_group[units],
            num_rows=self.num_rows[units],
            first_index=self.first_index[units],
            label=self.label[units] if len(self.label) else self.label,
        )

    @staticmethod
    def concatenate(tables: list[UnitTable]) -> UnitTable:
        """One table of the units of ``tables`` (all of one kind), in order."""
        offsets = np.cumsum([0] + [len(table.paths) for table in tables[:-1]])
        return UnitTable(
            kind=tables[0].kind,
            paths=pa.concat_arrays([table.paths for table in tables]),
            path_index=np.concatenate([table.path_index + offset for table, offset in zip(tables, offsets)]).astype(
                np.int32
            ),
            row_group=np.concatenate([table.row_group for table in tables]),
            num_rows=np.concatenate([table.num_rows for table in tables]),
            first_index=np.concatenate([table.first_index for table in tables]),
            label=np.concatenate([table.label for table in tables]),
        )


def unit_table(
    kind: UnitKind,
    paths: list[str],
    path_index: np.ndarray,
    row_group: np.ndarray | None = None,
    num_rows: np.ndarray | None = None,
    first_index: np.ndarray | None = None,
    label: np.ndarray | None = None,
) -> UnitTable:
    """A :class:`UnitTable` with the dtypes fixed; omitted columns get their defaults."""
    count = len(path_index)
    return UnitTable(
        kind=kind,
        paths=pa.array(paths, type=pa.string()),
        path_index=np.asarray(path_index, dtype=np.int32),
        row_group=np.zeros(count, np.int32) if row_group is None else np.asarray(row_group, dtype=np.int32),
        num_rows=np.full(count, -1, np.int64) if num_rows is None else np.asarray(num_rows, dtype=np.int64),
        first_index=np.full(count, -1, np.int64) if first_index is None else np.asarray(first_index, dtype=np.int64),
        label=np.zeros(0, np.int64) if label is None else np.asarray(label, dtype=np.int64),
    )


@dataclass(frozen=True)
class Collection:
    """A planned collection: its read units in a fixed order plus what is known about it."""

    layout: str
    units: UnitTable
    columns: ColumnNames = ColumnNames()
    class_names: tuple[str, ...] = ()
    num_images: int | None = None  # None when unknown without reading everything (tars)
    sources: tuple[str, ...] = ()

    @property
    def indexed(self) -> bool:
        """Whether every image has a stable dataset index (needed by the memory bank)."""
        return bool(len(self.units)) and bool((self.units.first_index >= 0).all())

    @property
    def labelled(self) -> bool:
        return self.columns.label is not None or bool(self.class_names)

    def select(self, units: np.ndarray | slice) -> Collection:
        """The same collection restricted to some of its units."""
        table = self.units.select(units)
        known = bool((table.num_rows >= 0).all())
        return replace(self, units=table, num_images=int(table.num_rows.sum()) if known else None)
