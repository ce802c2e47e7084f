"""Which of nvImageCodec's extensions a process loads.

nvImageCodec loads every extension in its package when it is imported. Two of them need a
library from a wheel of its own that `[gpu-images]` does not install (nvJPEG2000, nvTIFF):
without it they register nothing and print six lines, two of them red `[ERROR]`s, into
every GPU run's log ("Failed to load nvjpeg2k library! Please install ..."). Measured on
an H100 with the nvJPEG extension alone (docs/inputs.md, eleventh session), leaving the
others out changed neither the import's 1.05 s nor the job's wall clock: this only takes
that noise out of the user's log.

nvImageCodec reads NVIMGCODEC_EXTENSIONS_PATH once, at its import. The folder named there
is laid out as the package (links to everything else in it and beside it), because the
extensions find the CUDA libraries through `$ORIGIN`-relative RUNPATHs, and `$ORIGIN` is
the folder of the link, not of its target.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger("batch_infer")

ENV = "NVIMGCODEC_EXTENSIONS_PATH"

# extension -> (the wheel folder beside `nvimgcodec` that ships its library, that library)
NEEDS_LIBRARY = {
    "libnvjpeg2k_ext": ("nvjpeg2k", "libnvjpeg2k.so.0"),
    "libnvtiff_ext": ("nvtiff", "libnvtiff.so.0"),
}


def _library_loads(beside: Path, soname: str) -> bool:
    """Whether the extension would find `soname`: in its wheel's folder, CUDA's default
    install, or the loader's own search (LD_LIBRARY_PATH, ldconfig)."""
    if (beside / "lib" / soname).exists() or Path("/usr/local/cuda/lib64", soname).exists():
        return True
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def extensions_folder(package: Path, cache: Path) -> Path | None:
    """A folder of `package`'s extensions without those whose library is missing (made
    once under `cache`), or None when none is missing."""
    extensions = sorted((package / "extensions").glob("lib*_ext.so*"))
    missing = {
        name
        for name, (wheel, soname) in NEEDS_LIBRARY.items()
        if not _library_loads(package.parent / wheel, soname)
    }
    kept = [p for p in extensions if p.name.split(".so")[0] not in missing]
    return None if len(kept) == len(extensions) else linked_package(package, kept, cache)


def linked_package(package: Path, kept: list[Path], cache: Path) -> Path:
    """The extensions folder of a copy of `package` made of links, holding only `kept`
    (made once under `cache`, whole or not at all)."""
    key = hashlib.sha256("\n".join([str(package.resolve()), *(p.name for p in kept)]).encode())
    root = cache / f"nvimgcodec-{key.hexdigest()[:16]}"
    folder = root / package.name / "extensions"
    if folder.is_dir():
        return folder
    cache.mkdir(parents=True, exist_ok=True)
    draft = Path(tempfile.mkdtemp(prefix=".draft-", dir=cache))
    try:
        (draft / package.name / "extensions").mkdir(parents=True)
        for entry in package.iterdir():  # libnvimgcodec.so.0 for `$ORIGIN/..`
            if entry.name != "extensions":
                (draft / package.name / entry.name).symlink_to(entry.resolve())
        for entry in package.parent.iterdir():  # cu13/lib for `$ORIGIN/../../cu13/lib`
            if entry.name != package.name:
                (draft / entry.name).symlink_to(entry.resolve())
        for lib in kept:
            (draft / package.name / "extensions" / lib.name).symlink_to(lib.resolve())
        draft.rename(root)  # whole or not at all; another process may have made it first
    except OSError:
        if not folder.is_dir():
            raise
    finally:
        shutil.rmtree(draft, ignore_errors=True)
    return folder


def nvimgcodec_package() -> Path | None:
    """The folder of the installed nvImageCodec package, found without importing it."""
    try:
        spec = importlib.util.find_spec("nvidia.nvimgcodec")
    except ImportError:  # no `nvidia` package at all
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def load_installed_codecs_only(cache: Path | None = None) -> None:
    """Before nvImageCodec's import: name the folder of its usable extensions in
    NVIMGCODEC_EXTENSIONS_PATH, unless the user set it. Anything that fails leaves it
    unset: nvImageCodec then loads them all, as it would anyway."""
    if ENV in os.environ:
        return
    try:
        package = nvimgcodec_package()
        if package is None:
            return
        cache = cache or Path.home() / ".cache" / "batch-infer"
        folder = extensions_folder(package, cache)
    except (OSError, RuntimeError) as exc:  # RuntimeError: no home directory
        log.debug("nvImageCodec loads all its extensions (%s)", exc)
        return
    if folder is not None:
        os.environ[ENV] = str(folder)
        log.debug("nvImageCodec extensions: %s", folder)
