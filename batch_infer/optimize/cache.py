"""Optimized models, cached beside the TensorRT engines (`backends/engine_cache.py`'s pattern:
made once under a file lock, a JSON sidecar with the key and the model's sha256, remade with a
warning when an entry is corrupt).

Layout of the cache directory, one trio per key:
    optimized-<digest>/         model.onnx (and model.onnx.data for weights over 2 GB)
    optimized-<digest>.json     the key, the model's sha256 and the report it was made with
    optimized-<digest>.lock     the file lock held while making it
The model is made in a temporary folder beside it and renamed into place, and the sidecar is
written last: a model that failed the gate, or a half-made one, is never seen.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from filelock import FileLock

from batch_infer.backends.engine_cache import cache_dir_path, write_atomic
from batch_infer.errors import UserError
from batch_infer.model import ModelSignature, read_signature

log = logging.getLogger("batch_infer")


@dataclass(frozen=True)
class ArtifactKey:
    """Everything the optimized model depends on."""

    source_sha256: str  # the original model (external weights included)
    target: str  # Target.key()
    recipe: dict  # Recipe.describe()
    calibration: str  # the sample's fingerprint (calibration and gate rows)
    gate: dict  # the thresholds it passed
    tools: dict  # versions of the tools that made it

    def as_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), sort_keys=True))

    @property
    def stem(self) -> str:
        canonical = json.dumps(self.as_json(), sort_keys=True, separators=(",", ":"))
        return "optimized-" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass(frozen=True)
class Artifact:
    key: ArtifactKey
    signature: ModelSignature  # of the optimized model, in the cache
    report: dict
    made: bool  # True when this call made it, False on a cache hit

    @property
    def record(self) -> dict:
        """What a job's outputs depend on besides the optimized model's sha256 (its key)."""
        return self.key.as_json()


def _read(directory: Path, key: ArtifactKey) -> tuple[Artifact | None, str | None]:
    """(artifact, None) for a usable entry; (None, None) if absent; (None, why) if unusable."""
    model = directory / key.stem / "model.onnx"
    sidecar = directory / f"{key.stem}.json"
    if not sidecar.exists() and not model.exists():
        return None, None
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None, "has no readable .json beside it"
    if meta.get("key") != key.as_json():
        return None, "was written for another key"
    if not model.exists():
        return None, "has lost its model.onnx"
    try:
        signature = read_signature(str(model))
    except UserError as exc:
        return None, f"is unreadable ({exc})"
    if signature.sha256 != meta.get("model_sha256"):
        return None, "is corrupt (its sha256 does not match the one recorded when it was made)"
    return Artifact(key, signature, meta.get("report", {}), made=False), None


def get_or_make(
    key: ArtifactKey,
    make: Callable[[Path], tuple[Path, dict]],
    cache_dir: str | os.PathLike[str] | None = None,
) -> Artifact:
    """The optimized model for `key`: from the cache, or made once per machine under a file
    lock. `make(folder)` writes model.onnx into `folder` and returns (its path, report); it
    raises (the gate failed, a tool failed) to leave nothing behind."""
    directory = cache_dir_path(cache_dir)
    found, _ = _read(directory, key)
    if found is not None:
        return found
    with FileLock(str(directory / f"{key.stem}.lock")):
        found, problem = _read(directory, key)  # made while we waited?
        if found is not None:
            return found
        if problem:
            log.warning("cached optimized model %s %s; making it again", key.stem, problem)
        work = Path(tempfile.mkdtemp(prefix=f".{key.stem}.", dir=directory))
        try:
            path, report = make(work)
            if path != work / "model.onnx":
                raise RuntimeError(f"make() wrote {path}, not {work / 'model.onnx'}")
            final = directory / key.stem
            (directory / f"{key.stem}.json").unlink(missing_ok=True)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        signature = read_signature(str(final / "model.onnx"))
        meta = {"key": key.as_json(), "model_sha256": signature.sha256, "report": report}
        write_atomic(directory / f"{key.stem}.json", json.dumps(meta, indent=1).encode())
        return Artifact(key, signature, report, made=True)
