"""A per-node cache of built TensorRT engines.

Building an engine takes from seconds to many minutes, so it happens once per node, not once
per actor: every actor (and `batch-infer build`) asks the cache, the first one builds under a
file lock and the others wait and then read the same bytes.

Layout of the cache directory, one trio per key:
    <backend>-<digest>.engine   the serialized engine, exactly as TensorRT wrote it
    <backend>-<digest>.json     the key and the engine's sha256 (to detect corrupt files)
    <backend>-<digest>.lock     the file lock held while building
Files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from batch_infer.errors import BackendError

log = logging.getLogger("batch_infer")


@dataclass(frozen=True)
class EngineKey:
    """Everything that makes one engine different from another."""

    onnx_sha256: str
    backend: str  # "tensorrt" or "tensorrt-rtx"
    backend_version: str
    compute_capability: str  # "8.9"
    precision: str  # "fp32", "fp16" or "int8"
    slots: int  # one optimization profile per slot
    profile: Mapping[str, Sequence[Sequence[int]]]  # input -> (min, opt, max)
    sparse_weights: bool = False  # TensorRT's 2:4 sparse kernels allowed

    def as_json(self) -> dict:
        """The key as plain JSON values (tuples become lists), for hashing and the sidecar."""
        return json.loads(json.dumps(asdict(self), sort_keys=True))

    @property
    def digest(self) -> str:
        canonical = json.dumps(self.as_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:32]

    @property
    def stem(self) -> str:
        return f"{self.backend}-{self.digest}"


@dataclass(frozen=True)
class CachedEngine:
    path: Path
    data: bytes
    built: bool  # True when this call built it, False on a cache hit


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "batch-infer" / "engines"


def cache_dir_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cache directory (created if needed): `cache_dir`, or the per-user default."""
    path = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BackendError(f"engine cache {path}: cannot create it ({exc.strerror})") from None
    return path


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers see old or new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read(
    engine_path: Path, key: EngineKey, validate: Callable[[bytes], bool] | None
) -> tuple[bytes | None, str | None]:
    """(bytes, None) for a usable entry; (None, None) if absent; (None, why) if unusable."""
    try:
        data = engine_path.read_bytes()
    except FileNotFoundError:
        return None, None
    try:
        meta = json.loads(engine_path.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None, "has no readable .json beside it"
    if meta.get("key") != key.as_json():
        return None, "was written for another key"
    if meta.get("engine_sha256") != hashlib.sha256(data).hexdigest():
        return None, "is corrupt (its sha256 does not match the one recorded when it was built)"
    if validate is not None:
        try:
            ok = validate(data)
        except Exception as exc:
            ok, why = False, f"will not load ({exc})"
        else:
            why = f"will not load with {key.backend} {key.backend_version}"
        if not ok:
            return None, why
    return data, None


def _write(engine_path: Path, key: EngineKey, data: bytes) -> None:
    meta = {
        "key": key.as_json(),
        "engine_sha256": hashlib.sha256(data).hexdigest(),
        "bytes": len(data),
    }
    # Engine first, then its sidecar: a reader in between sees a mismatch, takes the lock
    # and waits for this writer, so it never uses a half-updated entry.
    write_atomic(engine_path, data)
    write_atomic(engine_path.with_suffix(".json"), json.dumps(meta, indent=1).encode())


def get_or_build(
    key: EngineKey,
    build: Callable[[], bytes],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    validate: Callable[[bytes], bool] | None = None,
    lock_timeout: float | None = None,
) -> CachedEngine:
    """The engine for `key`: from the cache, or built once per node under a file lock.

    `validate(data)` says whether the engine loads here (the runtime deserializes it); an
    entry that is corrupt or does not load is rebuilt with a warning. `lock_timeout` (seconds,
    None: wait as long as the other build takes) bounds the wait for another process's build.
    """
    directory = cache_dir_path(cache_dir)
    engine_path = directory / f"{key.stem}.engine"
    data, _ = _read(engine_path, key, validate)  # the common case needs no lock
    if data is not None:
        return CachedEngine(engine_path, data, built=False)

    lock = FileLock(str(directory / f"{key.stem}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process building %s", engine_path)
        try:
            lock.acquire(timeout=-1 if lock_timeout is None else lock_timeout)
        except Timeout:
            raise BackendError(
                f"engine cache: gave up after {lock_timeout} s waiting for the build of "
                f"{engine_path} in another process (lock {lock.lock_file})"
            ) from None
    try:
        data, problem = _read(engine_path, key, validate)  # built while we waited?
        if data is not None:
            return CachedEngine(engine_path, data, built=False)
        if problem:
            log.warning("cached engine %s %s; rebuilding it", engine_path, problem)
        data = build()
        if validate is not None and not validate(data):
            raise BackendError(
                f"the engine just built for {key.backend} {key.backend_version} does not load "
                f"on this machine (built for compute capability {key.compute_capability})"
            )
        _write(engine_path, key, data)
        return CachedEngine(engine_path, data, built=True)
    finally:
        lock.release()
