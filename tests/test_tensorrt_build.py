"""TensorRT-RTX engine builds and the engine cache, on a CPU-only machine.

TensorRT-RTX can build engines for a chosen compute capability without a GPU, so these tests
build real engines (for 8.9) from real ONNX models. Nothing here runs an engine: no machine
here can (full TensorRT is not installable; TensorRT-RTX engines do not run on Hopper).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

trt = pytest.importorskip(
    "tensorrt_rtx_bindings",
    reason="TensorRT-RTX bindings are not installed (pip install -e '.[test]' installs them)",
)

from batch_infer.backends import tensorrt_build as t  # noqa: E402 - after the skip
from batch_infer.backends.engine_cache import EngineKey, get_or_build  # noqa: E402
from batch_infer.errors import BackendError, SpecError  # noqa: E402
from batch_infer.model import read_signature  # noqa: E402
from batch_infer.planning import backend_options  # noqa: E402
from batch_infer.spec import resolve_spec  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DIGITS = ROOT / "models" / "digits.onnx"
RTX = "tensorrt-rtx"
SEQ_PROFILE = {name: {"min": [1, 1], "opt": [8, 16], "max": [8, 32]} for name in ("ids", "mask")}


def make_pooling_model(path: Path, vocab: int = 50, hidden: int = 8, seed: int = 0) -> str:
    """ids int64[N,S], mask int64[N,S] -> pooled float[N,H]: embedding, mask, mean over S."""
    emb = np.random.default_rng(seed).standard_normal((vocab, hidden)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "ids"], ["vectors"], name="embed"),
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT, name="cast"),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"], name="unsqueeze"),
        helper.make_node("Mul", ["vectors", "mask3"], ["masked"], name="apply_mask"),
        helper.make_node("ReduceMean", ["masked"], ["pooled"], axes=[1], keepdims=0, name="pool"),
    ]
    graph = helper.make_graph(
        nodes,
        "pooling",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", "S"]),
            helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", "S"]),
        ],
        [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", hidden])],
        [
            numpy_helper.from_array(emb, "emb"),
            numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


def ensure(onnx_path: str | Path, cache: Path, **kwargs):
    """Plan the recipe as planning does, then get the engine as an actor does."""
    kwargs = {"batch_size": 64, "compute_capability": "8.9", **kwargs}
    signature = read_signature(str(onnx_path))
    recipe = t.plan_recipe(RTX, signature.inputs, cache_dir=str(cache), **kwargs)
    return t.ensure_engine(signature, RTX, recipe)


@pytest.fixture
def builds(monkeypatch) -> list[dict]:
    """Records every real build that goes through `build_engine`."""
    calls: list[dict] = []
    real = t.build_engine

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(t, "build_engine", counting)
    return calls


def test_quickstart_model_builds_for_sm89_and_is_cached(tmp_path, builds):
    first = ensure(DIGITS, tmp_path)
    assert first.built and len(first.data) > 1000 and first.path.read_bytes() == first.data
    meta = json.loads(first.path.with_suffix(".json").read_text())
    assert meta["key"]["compute_capability"] == "8.9"
    assert meta["key"]["onnx_sha256"] == read_signature(str(DIGITS)).sha256
    assert meta["key"]["profile"] == {"pixels": [[1, 64], [64, 64], [64, 64]]}
    assert meta["key"]["slots"] == 2 and meta["key"]["precision"] == "fp32"

    hit = ensure(DIGITS, tmp_path)
    assert not hit.built and hit.data == first.data and len(builds) == 1
    assert ensure(DIGITS, tmp_path, precision="fp32").path == first.path  # fp32 == default


def test_dynamic_batch_and_sequence_model(tmp_path, builds):
    model = make_pooling_model(tmp_path / "pool.onnx")
    needs = r"input 'ids'.*dynamic dimension\(s\) \[1\].*tensorrt.profile.ids"
    with pytest.raises(SpecError, match=needs):
        ensure(model, tmp_path, batch_size=8)
    built = ensure(model, tmp_path, batch_size=8, profile=SEQ_PROFILE)
    assert built.built and len(builds) == 1
    assert builds[0]["profile"]["ids"] == ((1, 1), (8, 16), (8, 32))
    assert not ensure(model, tmp_path, batch_size=8, profile=SEQ_PROFILE).built
    with pytest.raises(SpecError, match="max batch 8 is below batch_size 16"):
        ensure(model, tmp_path, batch_size=16, profile=SEQ_PROFILE)


def test_profile_slots_capability_and_onnx_changes_make_new_keys(tmp_path, builds):
    base = ensure(DIGITS, tmp_path)
    changed = tmp_path / "digits-changed.onnx"
    model = onnx.load(str(DIGITS))
    model.doc_string = "retrained"
    onnx.save(model, changed)
    variants = [
        ensure(DIGITS, tmp_path, batch_size=32),  # profile
        ensure(
            DIGITS, tmp_path, profile={"pixels": {"min": [1, 64], "opt": [16, 64], "max": [64, 64]}}
        ),  # profile
        ensure(DIGITS, tmp_path, slots=3),  # number of profiles
        ensure(DIGITS, tmp_path, compute_capability="8.6"),
        ensure(changed, tmp_path),  # the ONNX
    ]
    paths = {base.path, *(v.path for v in variants)}
    assert len(paths) == 6 and all(v.built for v in variants) and len(builds) == 6
    # Precision: TensorRT-RTX refuses fp16 (see below), so the key is checked directly.
    key = EngineKey("sha", RTX, "1.7", "8.9", "fp32", 2, {"x": [[1], [8], [8]]})
    assert EngineKey(**{**key.__dict__, "precision": "fp16"}).digest != key.digest
    assert EngineKey(**{**key.__dict__, "backend_version": "1.8"}).digest != key.digest
    assert EngineKey(**{**key.__dict__}).digest == key.digest


RACE = """
import hashlib, json, os, sys, time
from pathlib import Path
from batch_infer.backends import tensorrt_build as t
from batch_infer.model import read_signature

cache, counter, ready, go, model = sys.argv[1:6]
real = t.build_engine

def counting_build(*args, **kwargs):
    with open(counter, "a") as f:  # inside the build: one line per build that happens
        f.write(f"{os.getpid()}\\n")
    time.sleep(1.0)  # hold the lock long enough for the other process to wait on it
    return real(*args, **kwargs)

t.build_engine = counting_build
signature = read_signature(model)
Path(ready, str(os.getpid())).touch()
while not Path(go).exists():
    time.sleep(0.005)
recipe = t.plan_recipe("tensorrt-rtx", signature.inputs, batch_size=32, cache_dir=cache,
                       compute_capability="8.9")
got = t.ensure_engine(signature, "tensorrt-rtx", recipe)
print(json.dumps({"built": got.built, "sha256": hashlib.sha256(got.data).hexdigest()}))
"""


def test_build_ahead_uses_the_recipe_the_actors_will(tmp_path):
    doc = {
        "name": "digits",
        "input": {"path": str(tmp_path / "unused")},
        "model": {"onnx": str(DIGITS), "inputs": {"pixels": "pixels"}},
        "output": {"path": str(tmp_path / "out")},
        "backend": RTX,
        "batch_size": 64,
        "tensorrt": {"cache_dir": str(tmp_path), "compute_capability": "8.9"},
    }
    spec = resolve_spec(doc)
    signature = read_signature(str(DIGITS))
    built = t.build_ahead(signature, backend_options(spec, signature))
    assert built.built and built.path.parent == tmp_path
    assert built.path == ensure(DIGITS, tmp_path).path  # the key the actors will ask for
    auto = resolve_spec({**doc, "backend": "auto"})
    with pytest.raises(SpecError, match="set backend: tensorrt or tensorrt-rtx"):
        t.build_ahead(signature, backend_options(auto, signature))


def test_planning_refuses_bad_tensorrt_settings_before_any_work(tmp_path):
    model = make_pooling_model(tmp_path / "pool.onnx")
    doc = {
        "name": "pool",
        "input": {"path": str(tmp_path / "unused")},
        "model": {"onnx": model, "inputs": {"ids": "ids", "mask": "mask"}},
        "output": {"path": str(tmp_path / "out")},
        "backend": RTX,
    }
    signature = read_signature(model)
    with pytest.raises(SpecError, match=r"tensorrt.profile.ids"):
        backend_options(resolve_spec(doc), signature)
    with pytest.raises(BackendError, match="strongly typed"):
        fp16 = {**doc, "tensorrt": {"precision": "fp16", "profile": SEQ_PROFILE}}
        backend_options(resolve_spec(fp16), signature)
    # auto: TensorRT is skipped for the model, with the reason, instead of failing the run
    options = backend_options(resolve_spec({**doc, "backend": "auto"}), signature)
    assert options.engine is None and "tensorrt.profile.ids" in options.engine_problem


def test_two_processes_racing_build_once_and_get_identical_bytes(tmp_path):
    script, counter, ready, go = (tmp_path / n for n in ("race.py", "builds.txt", "ready", "go"))
    script.write_text(RACE)
    ready.mkdir()
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    args = [
        sys.executable,
        str(script),
        str(tmp_path / "cache"),
        str(counter),
        str(ready),
        str(go),
        str(DIGITS),
    ]
    procs = [
        subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT
        )
        for _ in range(2)
    ]
    deadline = time.monotonic() + 30
    while len(list(ready.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    go.touch()  # both are ready: release them together
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert len(counter.read_text().splitlines()) == 1  # exactly one build happened
    assert sorted(r["built"] for r in results) == [False, True]
    assert results[0]["sha256"] == results[1]["sha256"]
    engines = list((tmp_path / "cache").glob("*.engine"))
    assert len(engines) == 1
    assert hashlib.sha256(engines[0].read_bytes()).hexdigest() == results[0]["sha256"]


def test_corrupt_cached_engine_is_rebuilt_with_a_warning(tmp_path, builds, caplog):
    first = ensure(DIGITS, tmp_path)
    first.path.write_bytes(first.data[: len(first.data) // 2])  # a torn or damaged file
    with caplog.at_level(logging.WARNING, logger="batch_infer"):
        again = ensure(DIGITS, tmp_path)
    assert again.built and again.data == first.data and len(builds) == 2
    assert any(
        "is corrupt" in r.getMessage() and "rebuilding" in r.getMessage() for r in caplog.records
    )
    assert not ensure(DIGITS, tmp_path).built


def test_engine_that_will_not_load_is_rebuilt_with_a_warning(tmp_path, caplog):
    key = EngineKey("sha", RTX, "1.7", "8.9", "fp32", 1, {"x": [[1], [8], [8]]})
    built = []

    def build() -> bytes:
        built.append(1)
        return b"engine v%d" % len(built)

    get_or_build(key, build, cache_dir=tmp_path)  # cached "v1"
    with caplog.at_level(logging.WARNING, logger="batch_infer"):
        got = get_or_build(key, build, cache_dir=tmp_path, validate=lambda d: d != b"engine v1")
    assert got.built and got.data == b"engine v2"
    assert any("will not load" in r.getMessage() for r in caplog.records)
    with pytest.raises(BackendError, match=r"just built .* does not load"):
        get_or_build(key, build, cache_dir=tmp_path, validate=lambda d: False)


def test_broken_onnx_error_names_the_node(tmp_path):
    graph = helper.make_graph(
        [
            helper.make_node("Relu", ["x"], ["r"], name="fine_relu"),
            helper.make_node("FrobnicateXYZ", ["r"], ["y"], name="mystery_node"),
        ],
        "broken",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "broken.onnx")
    with pytest.raises(BackendError, match=r"node 1 'mystery_node' \(operator FrobnicateXYZ\)"):
        ensure(tmp_path / "broken.onnx", tmp_path)
    assert not list(tmp_path.glob("*.engine"))


def test_fp16_with_tensorrt_rtx_is_refused_as_strongly_typed(tmp_path, builds):
    for precision in ("fp16", "int8"):
        with pytest.raises(BackendError, match="strongly typed: precision comes from the ONNX"):
            ensure(DIGITS, tmp_path, precision=precision)
    assert not builds


def test_capability_rtx_does_not_support_is_refused(tmp_path):
    with pytest.raises(BackendError, match=r"compute capability 9\.0 \(it supports .*8\.9"):
        ensure(DIGITS, tmp_path, compute_capability="9.0")


def test_data_dependent_output_is_refused():
    logger = t.make_logger(trt)
    network = trt.Builder(logger).create_network(0)
    x = network.add_input("x", trt.float32, (-1, 4))
    nonzero = network.add_non_zero(x)  # TensorRT-RTX's ONNX parser has no NonZero at all
    nonzero.name = "find_nonzero"
    nonzero.get_output(0).name = "indices"
    network.mark_output(nonzero.get_output(0))
    assert t.data_dependent_outputs(trt, network) == {"indices": "find_nonzero"}
    with pytest.raises(BackendError, match=r"'indices' .*layer 'find_nonzero'.*data-dependent"):
        t.refuse_data_dependent(trt, network)

    digits = trt.Builder(logger).create_network(0)
    assert trt.OnnxParser(digits, logger).parse_from_file(str(DIGITS))
    assert t.data_dependent_outputs(trt, digits) == {}
