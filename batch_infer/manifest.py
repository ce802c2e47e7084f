"""The output directory's bookkeeping: what is committed, and who may write.

Layout under the output path:

    part-<shard>.parquet            predictions of one committed shard
    _errors/part-<shard>.parquet    rows of that shard that could not be converted
    _manifest/job.json              what the outputs were computed from (model, mapping)
    _manifest/shards/<shard>.json   one entry per committed shard: the commit point
    _staging/<shard>-<attempt>/     files of a shard being written (never read by users)
    _runs/<run>.json                one summary per run, failed or not
    _SUCCESS                        the last run finished with every row accounted for
    _LOCK                           held by the running driver

A shard is committed when its entry lands in `_manifest/shards/` (written to a temporary
name, then renamed). Its files are staged first and moved into place after the entry, so a
crash between the two is finished on the next run (roll forward), and anything staged
without an entry is removed.
"""

from __future__ import annotations

import json
import os
import posixpath
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs
from filelock import FileLock, Timeout

from batch_infer.errors import OutputError

SHARDS = "_manifest/shards"
STAGING = "_staging"
ERRORS = "_errors"
RUNS = "_runs"
SUCCESS = "_SUCCESS"


@dataclass(frozen=True)
class Output:
    """An output location on any pyarrow filesystem."""

    filesystem: pafs.FileSystem
    root: str

    @classmethod
    def at(cls, path: str) -> Output:
        if "://" in path:
            fs, root = pafs.FileSystem.from_uri(path)
            return cls(fs, root.rstrip("/"))
        return cls(pafs.LocalFileSystem(), os.path.abspath(path))

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def exists(self, rel: str) -> bool:
        return self.filesystem.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def list(self, rel: str) -> list[pafs.FileInfo]:
        if not self.exists(rel):
            return []
        return self.filesystem.get_file_info(pafs.FileSelector(self.path(rel)))

    def read_json(self, rel: str) -> Any:
        with self.filesystem.open_input_stream(self.path(rel)) as f:
            return json.loads(f.read())

    def write_json(self, rel: str, doc: Any) -> None:
        """Write to a temporary name, then rename: readers never see half a file."""
        final = self.path(rel)
        self.filesystem.create_dir(posixpath.dirname(final), recursive=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with self.filesystem.open_output_stream(tmp) as f:
            f.write(json.dumps(doc, indent=1, sort_keys=True, default=str).encode())
        self.filesystem.move(tmp, final)

    def delete(self, rel: str) -> None:
        info = self.filesystem.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.filesystem.delete_dir(info.path)
        elif info.type == pafs.FileType.File:
            self.filesystem.delete_file(info.path)


def committed_entries(out: Output) -> dict[str, dict[str, Any]]:
    entries = {}
    for info in out.list(SHARDS):
        if info.base_name.endswith(".json"):
            entry = out.read_json(posixpath.relpath(info.path, out.root))
            entries[entry["shard"]] = entry
    return entries


def recover(out: Output) -> dict[str, dict[str, Any]]:
    """Finish interrupted commits, drop uncommitted leftovers; return the committed entries."""
    entries = committed_entries(out)
    for shard_id, entry in list(entries.items()):
        whole = True
        for final, staged in entry["staged"].items():
            if not out.exists(final):
                if out.exists(staged):
                    out.filesystem.move(out.path(staged), out.path(final))
                else:
                    whole = False
        if not whole:  # cannot happen unless files were deleted by hand: recompute the shard
            out.delete(f"{SHARDS}/{shard_id}.json")
            del entries[shard_id]
    out.delete(STAGING)
    referenced = {f for e in entries.values() for f in e["files"]}
    for rel_dir in ("", ERRORS):
        for info in out.list(rel_dir):
            rel = posixpath.relpath(info.path, out.root)
            if info.base_name.startswith("part-") and rel not in referenced:
                out.delete(rel)
    return entries


class OutputLock:
    """One run per output at a time.

    Local paths use an OS file lock, which a killed driver releases by dying. Other
    filesystems get a lock file that the holder refreshes; one not refreshed for
    `stale_after` seconds is taken over.
    """

    def __init__(self, out: Output, run_id: str, stale_after: float = 120.0) -> None:
        self.out, self.run_id, self.stale_after = out, run_id, stale_after
        self._filelock: FileLock | None = None
        self.info = {"run": run_id, "host": socket.gethostname(), "pid": os.getpid()}

    def acquire(self) -> None:
        self.out.filesystem.create_dir(self.out.root, recursive=True)
        if self.out.is_local:
            self._filelock = FileLock(self.out.path("_LOCK"), timeout=0)
            try:
                self._filelock.acquire()
            except Timeout:
                raise OutputError(self._held_message()) from None
            self.out.write_json("_LOCK.json", {**self.info, "since": time.time()})
            return
        if self.out.exists("_LOCK.json"):
            held = self.out.read_json("_LOCK.json")
            if time.time() - held.get("heartbeat", 0) < self.stale_after:
                raise OutputError(self._held_message())
        self.refresh()
        time.sleep(0.5)  # a racing writer may have written after us: the last one wins
        if self.out.read_json("_LOCK.json").get("run") != self.run_id:
            raise OutputError(self._held_message())

    def refresh(self) -> None:
        if not self.out.is_local:
            self.out.write_json("_LOCK.json", {**self.info, "heartbeat": time.time()})

    def _held_message(self) -> str:
        try:
            held = self.out.read_json("_LOCK.json")
            who = f" (run {held.get('run')}, pid {held.get('pid')} on {held.get('host')})"
        except (OSError, ValueError):
            who = ""
        return f"{self.out.root}: another batch-infer run is writing to this output{who}"

    def release(self) -> None:
        self.out.delete("_LOCK.json")
        if self._filelock is not None:
            self._filelock.release()
