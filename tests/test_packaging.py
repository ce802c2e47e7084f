"""What `pip install .` brings: every package batch_infer imports is declared.

The imports are read from the source (not from what happens to be installed), then each
top-level module is matched to the distribution that provides it here; pyproject.toml must
name that distribution in its dependencies or in one of its extras.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys

import tomllib

from tests.conftest import ROOT

# Modules whose distribution is not installed in the test environment, with where they come
# from (the extra that declares them, or why none does).
NOT_INSTALLED_HERE = {
    "tensorrt": None,  # full TensorRT: NVIDIA's images only (pip has stubs that download)
    "modelopt": "nvidia-modelopt",
    "cupy": "cupy-cuda13x",
    "cupyx": "cupy-cuda13x",
    "nvidia": "nvidia-nvimgcodec-cu13",
    "cuda": "cuda-python",
}


# Distributions that a declared one brings (cuda-python 12.6+ is cuda-bindings and friends).
BROUGHT_BY = {"cuda-bindings": "cuda-python", "cuda-pathfinder": "cuda-python"}


def _imported_modules() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "batch_infer").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found.add(node.module.split(".")[0])
    return {m for m in found if m not in sys.stdlib_module_names and m != "batch_infer"}


def _declared() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        specs += extra
    return {_norm(re.split(r"[\[<>=!~; ]", s, maxsplit=1)[0]) for s in specs}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_package_is_declared():
    providers = importlib.metadata.packages_distributions()
    declared = _declared()
    missing = {}
    for module in sorted(_imported_modules()):
        dists = providers.get(module)
        if dists is None:
            assert module in NOT_INSTALLED_HERE, f"{module}: not installed and not listed"
            expected = NOT_INSTALLED_HERE[module]
            if expected is not None and _norm(expected) not in declared:
                missing[module] = expected
            continue
        if not {_norm(BROUGHT_BY.get(d, d)) for d in dists} & declared:
            missing[module] = dists
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"


def test_the_client_install_does_not_need_the_inference_stack():
    """The base dependencies are the client: no ONNX Runtime, no CUDA, no Ray dashboard."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base = " ".join(project["dependencies"])
    for heavy in ("onnxruntime", "cuda-python", "ray[default]", "tensorrt"):
        assert heavy not in base, heavy
    extras = project["optional-dependencies"]
    assert any(s.startswith("onnxruntime>") for s in extras["cpu"])
    assert any(s.startswith("onnxruntime-gpu") for s in extras["gpu"])
    assert not any(s.startswith("onnxruntime>") for s in extras["gpu"])  # no uninstall needed
