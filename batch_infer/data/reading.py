"""Finding the input files and reading one shard of them, through `pyarrow.fs`.

The driver only lists files and reads their metadata; actors read the data, projected to
the columns the job needs.
"""

from __future__ import annotations

import fnmatch
import posixpath
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from batch_infer.errors import InputError
from batch_infer.location import Location, open_location

_GLOB_CHARS = "*?["
_SUFFIXES = {
    "parquet": (".parquet", ".pq"),
    "csv": (".csv", ".csv.gz"),
    "ipc": (".arrow", ".ipc", ".feather"),
}


@dataclass(frozen=True)
class InputFile:
    path: str  # as the filesystem names it
    relpath: str  # relative to the dataset's base: stable across moves, used in shard ids
    size: int
    mtime_ns: int
    partition: tuple[tuple[str, Any], ...] = ()

    @property
    def fingerprint(self) -> str:
        return _fingerprint(self.size, self.mtime_ns)


def _fingerprint(size: int | None, mtime_ns: int | None) -> str:
    """What tells a file's versions apart: a committed shard names its input's."""
    return f"{size}:{mtime_ns}"


@dataclass(frozen=True)
class Dataset:
    format: str
    filesystem: pafs.FileSystem
    base: str
    files: tuple[InputFile, ...]
    schema: pa.Schema  # file columns and hive partition columns
    partition_schema: pa.Schema

    @property
    def location(self) -> Location:
        """The folder every input file lies under."""
        return Location(self.filesystem, self.base, self.base)


def _hidden(rel: str) -> bool:
    return any(part.startswith(("_", ".")) for part in rel.split("/"))


def _list_files(fs: pafs.FileSystem, path: str, fmt: str) -> tuple[str, list[pafs.FileInfo]]:
    """(base directory, files): a file, a directory walked recursively, or a glob. A path
    that exists is taken as it is, even with glob characters in its name (`run[1]/`)."""
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound and any(c in path for c in _GLOB_CHARS):
        cut = min(path.index(c) for c in _GLOB_CHARS if c in path)
        base = posixpath.dirname(path[:cut]) or "."
        pattern = path
    else:
        if info.type == pafs.FileType.NotFound:
            raise InputError(f"input.path: {path}: no such file or directory")
        if info.type == pafs.FileType.File:
            return posixpath.dirname(path), [info]
        base, pattern = path.rstrip("/"), None
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
    except FileNotFoundError:
        raise InputError(f"input.path: {path}: no such directory {base!r}") from None
    files = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = posixpath.relpath(info.path, base)
        if _hidden(rel):
            continue
        if pattern is not None:
            if not fnmatch.fnmatch(info.path, pattern):
                continue
        elif not info.path.endswith(_SUFFIXES[fmt]):
            continue
        files.append(info)
    if not files:
        raise InputError(f"input.path: {path}: no {fmt} files found")
    return base, sorted(files, key=lambda i: i.path)


def open_dataset(path: str, fmt: str) -> Dataset:
    """List the input and learn its schema, reading no data."""
    where = open_location(path, "input.path", InputError)
    fs = where.filesystem
    base, infos = _list_files(fs, where.root, fmt)
    paths = [i.path for i in infos]
    try:
        dataset = ds.dataset(
            paths,
            filesystem=fs,
            format="arrow" if fmt == "ipc" else fmt,
            partitioning=ds.HivePartitioning.discover(infer_dictionary=False),
            partition_base_dir=base,
        )
        schema = dataset.schema
    except (pa.ArrowException, OSError) as exc:  # ArrowTypeError: files that disagree on types
        raise InputError(f"input.path: {path}: cannot read the input as {fmt}: {exc}") from None
    partition_names = [
        name
        for name in schema.names
        if any(f"/{name}=" in "/" + posixpath.relpath(p, base) for p in paths[:1])
    ]
    partitions = {}
    for fragment in dataset.get_fragments():
        keys = ds.get_partition_keys(fragment.partition_expression)
        partitions[fragment.path] = tuple(sorted(keys.items()))
    files = tuple(
        InputFile(
            path=i.path,
            relpath=posixpath.relpath(i.path, base),
            size=i.size,
            mtime_ns=i.mtime_ns or 0,
            partition=partitions.get(i.path, ()),
        )
        for i in infos
    )
    partition_schema = pa.schema([schema.field(n) for n in partition_names])
    return Dataset(fmt, fs, base, files, schema, partition_schema)


def _add_partition_columns(
    table: pa.Table, file: InputFile, columns: list[str], partition_schema: pa.Schema
) -> pa.Table:
    values = dict(file.partition)
    for name in columns:
        if name in partition_schema.names and name not in table.column_names:
            field = partition_schema.field(name)
            filled = pc.fill_null(
                pa.nulls(table.num_rows, field.type), pa.scalar(values.get(name), field.type)
            )
            table = table.append_column(field, filled)
    return table.select(columns)


def read_rows(
    dataset: Dataset,
    file: InputFile,
    columns: list[str],
    text_columns: set[str],
    row_groups: tuple[int, ...] = (),
    first_row: int = 0,
    row_start: int = 0,
    row_stop: int | None = None,
) -> pa.Table:
    """Read rows [row_start, row_stop) of one file, projected to `columns`.

    `text_columns` are read from CSV as text, so a value that is not a number becomes a bad
    row instead of failing the whole file.
    """
    fs = dataset.filesystem
    file_columns = [c for c in columns if c not in dataset.partition_schema.names]
    try:
        now = fs.get_file_info(file.path)
        if _fingerprint(now.size, now.mtime_ns) != file.fingerprint:  # the shards' plan is off
            state = "is gone" if now.type == pafs.FileType.NotFound else "changed"
            raise InputError(
                f"{file.path}: {state} since the run planned its shards; rows of two versions "
                "of it would mix: rerun once it has stopped changing"
            )
        if dataset.format == "parquet":
            with fs.open_input_file(file.path) as f:
                pfile = pq.ParquetFile(f)
                missing = [c for c in file_columns if c not in pfile.schema_arrow.names]
                if missing:
                    raise InputError(f"{file.path}: no column {missing[0]!r} in this file")
                table = pfile.read_row_groups(
                    list(row_groups), columns=file_columns, use_threads=False
                )
            stop = None if row_stop is None else row_stop - first_row
            table = table.slice(
                row_start - first_row, None if stop is None else stop - (row_start - first_row)
            )
        elif dataset.format == "csv":
            types = {
                c: (pa.string() if c in text_columns else dataset.schema.field(c).type)
                for c in file_columns
            }
            with fs.open_input_stream(file.path, compression="detect") as f:
                table = pacsv.read_csv(
                    f,
                    convert_options=pacsv.ConvertOptions(
                        include_columns=file_columns, column_types=types
                    ),
                )
        else:
            with fs.open_input_file(file.path) as f:
                table = pa.ipc.open_file(f).read_all()
            missing = [c for c in file_columns if c not in table.column_names]
            if missing:
                raise InputError(f"{file.path}: no column {missing[0]!r} in this file")
            table = table.select(file_columns)
    except InputError:
        raise
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{file.path}: cannot read this {dataset.format} file: {exc}") from None
    return _add_partition_columns(table, file, columns, dataset.partition_schema)
