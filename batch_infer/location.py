"""One way to open a place on any filesystem: local paths and URIs (s3://, gs://, hdfs://,
file://) through `pyarrow.fs`, with errors that name the place and the spec key.

Inputs, outputs and queries all open their paths here, so "is this a URI", "where does it
really live" and "what went wrong" have one answer each.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from batch_infer.errors import UserError


def is_uri(path: str) -> bool:
    """Whether `path` names a filesystem by scheme (s3://...) rather than a local path."""
    return "://" in path


def absolute(path: str) -> str:
    """A local path made absolute (`~` expanded); a URI unchanged."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


@dataclass(frozen=True)
class Location:
    """A directory or file on a pyarrow filesystem. `root` is the filesystem's own path."""

    filesystem: pafs.FileSystem
    root: str
    given: str  # as the user wrote it (for messages)

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    @property
    def real(self) -> str:
        """The root with symbolic links resolved (local), so two spellings compare equal."""
        return os.path.realpath(self.root) if self.is_local else self.root.rstrip("/")

    def contains(self, other: Location) -> bool:
        """Whether `other` is this location or lies below it (same filesystem)."""
        if type(self.filesystem) is not type(other.filesystem):
            return False
        mine, theirs = self.real.rstrip("/"), other.real.rstrip("/")
        return theirs == mine or theirs.startswith(mine + "/")

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def info(self, rel: str = "") -> pafs.FileInfo:
        return self.filesystem.get_file_info(self.path(rel) if rel else self.root)

    def exists(self, rel: str = "") -> bool:
        return self.info(rel).type != pafs.FileType.NotFound

    def list(self, rel: str = "", recursive: bool = False) -> list[pafs.FileInfo]:
        if not self.exists(rel):
            return []
        selector = pafs.FileSelector(self.path(rel), recursive=recursive)
        return self.filesystem.get_file_info(selector)

    def read_json(self, rel: str) -> Any:
        with self.filesystem.open_input_stream(self.path(rel)) as f:
            return json.loads(f.read())

    def write_json(self, rel: str, doc: Any) -> None:
        """Write to a temporary name, then rename: readers never see half a file, and a
        failed write leaves no temporary file behind. Durable once it returns (`sync`)."""
        final = self.path(rel)
        folder = posixpath.dirname(final)
        self.filesystem.create_dir(folder, recursive=True)
        tmp = f"{folder}/.{posixpath.basename(final)}.tmp-{uuid.uuid4().hex[:8]}"
        data = json.dumps(doc, indent=1, sort_keys=True, default=str).encode()
        try:
            with self.filesystem.open_output_stream(tmp) as f:
                f.write(data)
            self.sync(tmp)
            self.filesystem.move(tmp, final)
            self.sync(folder)
        except BaseException:
            with contextlib.suppress(OSError, pa.ArrowException):
                self.filesystem.delete_file(tmp)
            raise

    def sync(self, *paths: str) -> None:
        """Flush files, or folders' lists of names, to a local disk (fsync): what a commit
        names must survive a power loss as the commit does. Paths are the filesystem's own
        (`path()`); object stores have a write durable once it returns."""
        if not self.is_local:
            return
        for path in paths:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def delete(self, rel: str) -> None:
        info = self.info(rel)
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.filesystem.delete_file(info.path)


def open_location(path: str, what: str, error: type[UserError] = UserError) -> Location:
    """Open `path` (local or URI); `what` names it in errors ("input.path", "output.path").

    Only the filesystem is opened: nothing is read, and a missing path is not an error here.
    """
    if not is_uri(path):
        return Location(pafs.LocalFileSystem(), absolute(path), path)
    try:
        fs, root = pafs.FileSystem.from_uri(path)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise error(f"{what}: {path}: cannot open this location ({exc})") from None
    return Location(fs, root.rstrip("/") or "/", path)
