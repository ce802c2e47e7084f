"""Model optimization (batch_infer/optimize/) on the CPU: real models, real Parquet inputs,
real ONNX Runtime quantization and fusion, real TensorRT-RTX builds for compute capability
8.9 (built here, never run: no machine here runs them). Speed is measured in
benchmarks/cpu_optimize.py, not here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from onnx import TensorProto

import batch_infer
from batch_infer.cli import main
from batch_infer.errors import InputError, OutputError, SpecError
from batch_infer.model import read_signature
from batch_infer.optimize.calibration import draw_sample
from batch_infer.optimize.gate import GateFailed
from batch_infer.optimize.targets import gpu_here, int8_dot_flag
from batch_infer.planning import build_plan
from batch_infer.spec import resolve_spec
from tests.conftest import make_linear_model, run_records
from tests.optimize_models import (
    CNN,
    HEADS,
    HIDDEN,
    TINY_BERT,
    make_outlier_model,
    make_sparse_model,
    write_features,
    write_images,
    write_tokens,
)

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "jobs" / "quickstart.yaml"
DIGITS = ROOT / "models" / "digits.onnx"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return write_images(tmp_path_factory.mktemp("images"), 1000, files=2)


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    return write_tokens(tmp_path_factory.mktemp("tokens"), 800)


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    return write_features(tmp_path_factory.mktemp("features"), 1000)


def spec_of(model: Path | str, data: Path, inputs: dict, out: Path, cache: Path, **opt) -> dict:
    gate = opt.pop("gate", {})
    return {
        "name": "opt",
        "input": {"path": str(data)},
        "model": {"onnx": str(model), "inputs": inputs, "optimize": {**opt, "gate": gate}},
        "output": {"path": str(out)},
        "batch_size": 128,
        "tensorrt": {"cache_dir": str(cache), "compute_capability": "8.9"},
    }


def cached(cache: Path) -> list[str]:
    """Names of the optimized models in a cache directory (folders and sidecars)."""
    return sorted(p.name for p in cache.glob("optimized-*") if p.suffix != ".lock")


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def quickstart_args(cache: Path, out: Path, *more: str) -> list[str]:
    return ["optimize", QUICKSTART, "--set", f"tensorrt.cache_dir={cache}",
            "--set", f"output.path={out}", *more]  # fmt: skip


# -- ONNX Runtime on the CPU: int8 from the job's own rows, the gate, the cache -------------


def test_quickstart_int8_passes_the_gate_and_is_cached(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)  # the quickstart's paths are relative to the repository
    report_path = tmp_path / "report.json"
    args = quickstart_args(
        tmp_path / "cache",
        tmp_path / "out",
        "--set",
        "model.optimize.precision=int8",
        "--json",
        report_path,
    )
    code, out, _ = cli(args, capsys)
    assert code == 0
    report = json.loads(report_path.read_text())
    gate = report["gate"]
    assert gate["passed"] and gate["rows"] == 256 and gate["classifier_outputs"] == ["logits"]
    assert gate["outputs"]["logits"]["top1_agreement"] >= 0.99
    assert gate["outputs"]["predicted"]["agreement"] >= 0.99  # the argmax output
    assert report["target"]["name"] == "onnxruntime-cpu"
    recipe = report["recipe"]
    assert recipe["activations"] == "uint8" and recipe["per_channel"]
    assert recipe["reduce_range"] == (int8_dot_flag() is None)
    assert report["after"]["qdq"]["QuantizeLinear"] > 0
    assert report["after"]["compute_precisions"] == {"int8": 2}
    assert report["before"]["compute_precisions"] == {"fp32": 2}
    assert report["after"]["weights_bytes"] < report["before"]["weights_bytes"]
    cal = report["calibration"]
    assert cal["calibration_rows"] == 512 and cal["gate_rows"] == 256
    assert {s["file"].split("/")[0] for s in cal["sources"]} == {"split=test", "split=train"}
    speed = report["speed"]
    assert speed["original_rows_per_s"] > 0 and speed["optimized_rows_per_s"] > 0
    assert "accuracy gate: passed" in out and report["cached"] is False
    model = Path(report["optimized_model"])
    folder = model.parent.name
    assert model.exists() and cached(tmp_path / "cache") == [folder, folder + ".json"]

    code, out, _ = cli(args, capsys)
    again = json.loads(report_path.read_text())
    assert code == 0 and again["cached"] is True and "from the cache" in out
    assert again["optimized_sha256"] == report["optimized_sha256"]


def test_cnn_int8_from_its_own_images_passes_the_gate(tmp_path, images):
    spec = resolve_spec(spec_of(CNN, images, {"pixels": "pixels"}, tmp_path / "out",
                                tmp_path / "cache", precision="int8"))  # fmt: skip
    plan = build_plan(spec)
    report = plan.optimized.report
    logits = report["gate"]["outputs"]["logits"]
    assert report["gate"]["passed"] and logits["top1_agreement"] >= 0.99
    assert logits["rel_l2"] < 0.05 and logits["cosine"] > 0.999
    assert report["after"]["compute_precisions"] == {"int8": 6}  # 5 convolutions, 1 Gemm
    assert plan.signature.path != str(CNN) and plan.backend.requested == "onnxruntime"
    assert plan.config()["model_sha256"] == plan.signature.sha256 != report["source_sha256"]


def test_calibration_rows_are_the_jobs_own_seeded_spread_and_disjoint(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for f in range(3):  # the row id is the model input's first value; some rows are bad
        ids = np.arange(f * 400, (f + 1) * 400, dtype=np.float64)
        a = pa.array(ids, mask=(ids % 50 == 7))  # nulls: bad rows, never sampled
        table = pa.table({"a": a, "b": ids * 2, "c": ids * 3})
        pq.write_table(table, data / f"part-{f}.parquet", row_group_size=100)
    model = make_linear_model(tmp_path / "linear.onnx")
    spec = {"name": "s", "input": {"path": str(data)},
            "model": {"onnx": model, "inputs": {"x": ["a", "b", "c"]}},
            "output": {"path": str(tmp_path / "out"), "keep_columns": ["b"]}}  # fmt: skip
    plan = build_plan(resolve_spec(spec))
    sample = draw_sample(plan, 300, 200, seed=1)
    cal, gate = sample.calibration["x"][:, 0], sample.gate["x"][:, 0]
    assert len(cal) == 300 and len(gate) == 200 and not set(cal) & set(gate)
    assert not any(int(i) % 50 == 7 for i in (*cal, *gate))
    assert (sample.calibration["x"][:, 1] == cal * 2).all()  # converted as a run converts
    for lo in range(0, 1200, 400):  # every file contributes
        assert ((cal >= lo) & (cal < lo + 400)).sum() > 30
    assert draw_sample(plan, 300, 200, seed=1).fingerprint() == sample.fingerprint()
    assert draw_sample(plan, 300, 200, seed=2).fingerprint() != sample.fingerprint()
    with pytest.raises(InputError, match=r"has \d+ good rows.*need 1500; lower them"):
        draw_sample(plan, 1000, 500, seed=1)


def test_deliberately_bad_recipe_is_caught_exit_2_and_nothing_cached(tmp_path, features, capsys):
    """Per-tensor int8 weights on a model with one outlier weight: every other weight rounds
    to a few values. The same model per-channel passes the same gate (the control)."""
    model = make_outlier_model(tmp_path / "outlier.onnx")
    cache = tmp_path / "cache"
    gate = {"max_rel_l2": 0.1, "min_top1_agreement": 0.95}
    doc = spec_of(model, features, {"x": "x"}, tmp_path / "out", cache, precision="int8",
                  gate=gate)  # fmt: skip
    spec_path = tmp_path / "spec.json"  # JSON is YAML
    spec_path.write_text(json.dumps(doc))
    report_path = tmp_path / "bad.json"
    code, _, err = cli(["optimize", spec_path, "--set", "model.optimize.int8.per_channel=false",
                        "--json", report_path], capsys)  # fmt: skip
    assert code == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: model.optimize: the int8 model for onnxruntime-cpu fails")
    assert "logits relative L2" in line and "nothing was cached or used" in line
    bad = json.loads(report_path.read_text())
    assert not bad["gate"]["passed"] and bad["gate"]["outputs"]["logits"]["rel_l2"] > 0.2
    assert cached(cache) == []
    assert not [p for p in cache.iterdir() if p.is_dir()]  # no half-made folder either
    with pytest.raises(GateFailed):
        batch_infer.run(spec_path, overrides={"model.optimize.int8.per_channel": False})
    assert not (tmp_path / "out").exists() and cached(cache) == []

    code, _, _ = cli(["optimize", spec_path, "--json", report_path], capsys)
    good = json.loads(report_path.read_text())
    assert code == 0 and good["gate"]["outputs"]["logits"]["rel_l2"] < 0.05
    assert len(cached(cache)) == 2


@pytest.mark.skipif(
    int8_dot_flag() is not None, reason=f"this CPU has {int8_dot_flag()}: int8 does not saturate"
)
def test_signed_activations_without_reduce_range_saturate_on_a_cpu_without_vnni(tmp_path, images):
    """Where the CPU lacks VNNI, ONNX Runtime's int8 kernels add pairs of u8*s8 products in
    16 bits: TensorRT's recipe (signed activations) with full-range weights can saturate.
    The default recipe for this CPU (reduce_range) must pass the same gate."""
    doc = spec_of(CNN, images, {"pixels": "pixels"}, tmp_path / "out", tmp_path / "cache",
                  precision="int8", int8={"activations": "int8", "reduce_range": False},
                  gate={"max_rel_l2": 0.02})  # fmt: skip
    with pytest.raises(GateFailed, match="fails the accuracy gate"):
        build_plan(resolve_spec(doc))
    assert cached(tmp_path / "cache") == []
    doc["model"]["optimize"].pop("int8")
    assert build_plan(resolve_spec(doc)).optimized.report["recipe"]["reduce_range"] is True


# -- the run uses the optimized model, and says so ----------------------------------------


def test_run_uses_the_optimized_model_and_resumes_refuse_to_mix(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out, cache = tmp_path / "out", tmp_path / "cache"
    overrides = {"output.path": str(out), "tensorrt.cache_dir": str(cache),
                 "model.optimize.precision": "int8"}  # fmt: skip
    record = batch_infer.run(QUICKSTART, overrides=overrides)
    assert record.status == "succeeded" and record.good_rows == 1797
    job = json.loads((out / "_manifest" / "job.json").read_text())
    optimized = next(cache.glob("optimized-*/model.onnx"))
    sha = read_signature(str(optimized)).sha256
    assert job["model_sha256"] == sha == record.model_sha256
    assert job["optimize"]["source_sha256"] == read_signature(str(DIGITS)).sha256
    assert job["optimize"]["recipe"]["precision"] == "int8"
    assert len(job["optimize"]["calibration"]) == 64  # the sample's sha256
    (run,) = run_records(out)
    assert run["optimized"]["recipe"]["precision"] == "int8"  # the run says which model ran
    assert run["optimized"]["path"] == str(optimized) and run["model_sha256"] == sha
    shards = [json.loads(p.read_text()) for p in (out / "_manifest" / "shards").glob("*.json")]
    assert shards and {s["model_sha256"] for s in shards} == {sha}
    table = pq.read_table(out)
    accuracy = np.mean(table["predicted"].to_numpy() == table["label"].to_numpy())
    assert accuracy > 0.95  # the fp32 model's is 0.97

    fp16 = {**overrides, "model.optimize.precision": "fp16"}
    with pytest.raises(OutputError, match="model_sha256"):
        batch_infer.run(QUICKSTART, overrides=fp16)


# -- fusion for ONNX Runtime, and why not -----------------------------------------------


def test_bert_fusion_names_the_fused_attention_and_says_why_not(tmp_path, tokens):
    inputs = {"ids": "ids", "mask": "mask"}
    fused = spec_of(TINY_BERT, tokens, inputs, tmp_path / "out", tmp_path / "cache",
                    num_heads=HEADS, hidden_size=HIDDEN)  # fmt: skip
    report = build_plan(resolve_spec(fused)).optimized.report
    assert report["fusion"]["fused"] == {"EmbedLayerNormalization": 1, "Attention": 2,
                                         "BiasGelu": 2, "SkipLayerNormalization": 4}  # fmt: skip
    assert report["after"]["ops"]["com.microsoft.Attention"] == 2
    assert "Softmax" not in report["after"]["ops"] and report["before"]["ops"]["Softmax"] == 2
    assert report["gate"]["passed"] and report["gate"]["outputs"]["pooled"]["rel_l2"] < 1e-5
    assert report["gate"]["classifier_outputs"] == []  # pooled embeddings: no top-1

    plain = spec_of(TINY_BERT, tokens, inputs, tmp_path / "out", tmp_path / "cache")
    report = build_plan(resolve_spec(plain)).optimized.report
    assert "Attention" not in report["fusion"]["fused"]
    notes = " ".join(report["fusion"]["not_fused"])
    assert "Failed to detect num_heads and hidden_size" in notes
    assert "Attention not fused: 2 Softmax node(s) remain" in notes


def test_fused_int8_bert_quantizes_past_the_fused_ops(tmp_path, tokens):
    doc = spec_of(
        TINY_BERT,
        tokens,
        {"ids": "ids", "mask": "mask"},
        tmp_path / "out",
        tmp_path / "cache",
        precision="int8",
        num_heads=HEADS,
        hidden_size=HIDDEN,
    )
    report = build_plan(resolve_spec(doc)).optimized.report
    after = report["after"]
    assert after["qdq"]["QuantizeLinear"] > 10 and after["ops"]["com.microsoft.Attention"] == 2
    kept = {n["op"] for n in after["compute_nodes"] if n["precision"] == "fp32"}
    assert kept == {"Attention"}  # the quantizer leaves fused attention in fp32, and says so
    assert report["gate"]["passed"]


# -- TensorRT-RTX: engines from optimized models, their layer table ----------------------


@pytest.mark.parametrize(("precision", "layer_type"), [("int8", "Int8"), ("fp16", "Half")])
def test_tensorrt_rtx_engine_builds_from_the_optimized_model(
    tmp_path, images, precision, layer_type
):
    doc = spec_of(CNN, images, {"pixels": "pixels"}, tmp_path / "out", tmp_path / "cache",
                  precision=precision, target="tensorrt-rtx")  # fmt: skip
    before = sorted(p.name for p in CNN.parent.iterdir())
    plan = build_plan(resolve_spec(doc))
    assert sorted(p.name for p in CNN.parent.iterdir()) == before  # nothing written beside it
    report = plan.optimized.report
    layers = report["tensorrt"]
    assert layers["compute_capability"] == "8.9" and layers["source"] == "DETAILED build log"
    assert layers["precisions"].get(layer_type, 0) >= 5  # the convolutions at least
    model = onnx.load(plan.signature.path)
    node_names = {n.name for n in model.graph.node}
    named = {node for layer in layers["layers"] for node in layer["onnx_nodes"]}
    assert named and named <= node_names  # each fused node is a node of the optimized model
    convs = [layer for layer in layers["layers"] if any("Conv" in n for n in layer["onnx_nodes"])]
    assert convs and all(layer["type"] for layer in convs)
    assert not any(n.domain == "com.microsoft" for n in model.graph.node)  # TensorRT parses it
    assert "fusion" not in report  # TensorRT fuses for itself
    assert report["gate"]["passed"] and "graph optimizations off" in report["gate"]["ran_on"]
    assert "skipped" in report["speed"]
    assert plan.backend.requested == "tensorrt-rtx" and plan.spec.backend == "tensorrt-rtx"
    if precision == "int8":  # TensorRT's recipe: signed, symmetric (zero points 0)
        inits = {t.name: t for t in model.graph.initializer}
        zero_points = [inits[n.input[2]] for n in model.graph.node
                       if n.op_type == "QuantizeLinear" and len(n.input) > 2]  # fmt: skip
        assert zero_points and {z.data_type for z in zero_points} == {TensorProto.INT8}
        assert all(not onnx.numpy_helper.to_array(z).any() for z in zero_points)
        assert report["recipe"]["quantize_bias"] is False


def test_fp8_for_tensorrt_rtx_from_model_optimizer(tmp_path, images):
    """FP8 Q/DQ from NVIDIA Model Optimizer, calibrated on the job's rows; the engine builds
    for 8.9 (Ada has FP8). Runs where the optimize extra is installed (not in CI's test
    install: Model Optimizer needs torch)."""
    pytest.importorskip("modelopt.onnx.quantization", reason="pip install -e '.[optimize]'")
    doc = spec_of(CNN, images, {"pixels": "pixels"}, tmp_path / "out", tmp_path / "cache",
                  precision="fp8", target="tensorrt-rtx")  # fmt: skip
    before = CNN.read_bytes()
    report = build_plan(resolve_spec(doc)).optimized.report
    assert CNN.read_bytes() == before  # the tools got a copy (Model Optimizer writes into it)
    assert report["recipe"]["tool"] == "modelopt" and report["after"]["qdq"]["QuantizeLinear"]
    assert report["after"]["compute_precisions"].get("fp8", 0) >= 4
    assert report["tensorrt"]["precisions"].get("FP8", 0) >= 4
    assert report["gate"]["passed"]


def test_sparsity_reports_2_4_weights_and_sets_the_flag(tmp_path, capsys):
    model = make_sparse_model(tmp_path / "sparse.onnx")
    data = tmp_path / "data"
    data.mkdir()
    x = np.random.default_rng(0).normal(size=(600, 8 * 6 * 6)).astype(np.float32)
    pq.write_table(pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 288)}),
                   data / "part-0.parquet", row_group_size=200)  # fmt: skip
    cache = tmp_path / "cache"
    doc = spec_of(model, data, {"pixels": "x"}, tmp_path / "out", cache, target="tensorrt-rtx",
                  sparsity=True, calibration_rows=256)  # fmt: skip
    plan = build_plan(resolve_spec(doc))
    sparse = {s["tensor"]: s for s in plan.optimized.report["after"]["sparsity_2_4"]}
    assert sparse["conv_w"]["qualifies"] and sparse["conv_w"]["input_channels"] == 8
    assert not sparse["dense_w"]["qualifies"] and sparse["dense_w"]["groups_ok"] < 1
    assert plan.backend.engine.sparse_weights
    spec_path = tmp_path / "spec.json"
    spec_path.write_text(json.dumps(doc))
    code, out, _ = cli(["build", spec_path], capsys)
    meta = json.loads(next(cache.glob("tensorrt-rtx-*.json")).read_text())
    assert code == 0 and "engine built" in out and meta["key"]["sparse_weights"] is True
    assert meta["key"]["onnx_sha256"] == plan.signature.sha256  # the optimized model's engine
    doc["model"]["optimize"]["target"] = "onnxruntime-cpu"
    with pytest.raises(SpecError, match="sparse weights are a TensorRT flag"):
        build_plan(resolve_spec(doc))


# -- on a GPU (python -m pytest -m gpu tests/test_optimize.py on the device machine) --------


@pytest.mark.gpu
@pytest.mark.skipif(not gpu_here(), reason="needs an NVIDIA GPU with onnxruntime-gpu")
def test_fp16_and_fusion_for_onnxruntime_cuda_gate_on_the_gpu_and_run(tmp_path, images, tokens):
    cache = tmp_path / "cache"
    doc = spec_of(CNN, images, {"pixels": "pixels"}, tmp_path / "out", cache, precision="fp16",
                  fuse=False, target="onnxruntime-cuda")  # fmt: skip
    doc["backend"], doc["output"]["keep_columns"] = "onnxruntime", ["label"]
    report = build_plan(resolve_spec(doc)).optimized.report
    assert report["gate"]["ran_on"] == "onnxruntime-cuda" and report["gate"]["passed"]
    assert report["speed"]["ran_on"] == "onnxruntime-cuda"
    assert report["after"]["compute_precisions"] == {"fp16": 6}
    record = batch_infer.run(doc)
    assert record.status == "succeeded" and "CUDA" in record.backend
    table = pq.read_table(tmp_path / "out")
    logits = np.stack(table["logits"].to_numpy(zero_copy_only=False))
    assert np.mean(logits.argmax(axis=1) == table["label"].to_numpy()) >= 0.99

    bert = spec_of(TINY_BERT, tokens, {"ids": "ids", "mask": "mask"}, tmp_path / "bert", cache,
                   precision="fp16", num_heads=HEADS, hidden_size=HIDDEN,
                   target="onnxruntime-cuda")  # fmt: skip
    bert["backend"] = "onnxruntime"
    report = build_plan(resolve_spec(bert)).optimized.report
    assert report["fusion"]["fused"]["Attention"] == 2
    assert report["gate"]["ran_on"] == "onnxruntime-cuda" and report["gate"]["passed"]


# -- what is refused, in one line -----------------------------------------------------------


def test_refusals_are_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, _, err = cli(["optimize", QUICKSTART], capsys)
    assert code == 2 and "model.optimize is not set" in err
    code, _, err = cli(
        quickstart_args(tmp_path / "c", tmp_path / "o", "--set", "model.optimize.precision=fp8"),
        capsys,
    )
    assert code == 2 and "fp8 runs on TensorRT targets only" in err
    code, _, err = cli(
        quickstart_args(
            tmp_path / "c", tmp_path / "o", "--set", "model.optimize.calibration_rows=2000"
        ),
        capsys,
    )
    assert code == 2 and "lower them" in err and len(err.strip().splitlines()) == 1
    code, _, err = cli(
        quickstart_args(tmp_path / "c", tmp_path / "o", "--set", "model.optimize.precision=int4"),
        capsys,
    )
    assert code == 2 and "model.optimize.precision" in err
    assert cached(tmp_path / "c") == []


def test_corrupt_cached_model_is_made_again_with_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.chdir(ROOT)
    overrides = {
        "tensorrt.cache_dir": str(tmp_path / "cache"),
        "output.path": str(tmp_path / "out"),
        "model.optimize.precision": "fp16",
    }
    first = build_plan(resolve_spec(QUICKSTART, overrides))
    path = Path(first.signature.path)
    path.write_bytes(path.read_bytes()[:-10])
    again = build_plan(resolve_spec(QUICKSTART, overrides))
    assert again.optimized.made and "making it again" in caplog.text
    assert again.signature.sha256 == first.signature.sha256


def test_optimize_help_imports_no_onnxruntime_torch_or_modelopt():
    probe = ("import sys\nsys.argv = ['batch-infer', 'optimize', '--help']\n"
             "from batch_infer import cli\ntry:\n    cli.main()\nexcept SystemExit:\n    pass\n"
             "print(sorted(m for m in ('onnxruntime', 'torch', 'modelopt', 'ray') "
             "if m in sys.modules), file=sys.stderr)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0 and done.stderr.strip().splitlines()[-1] == "[]", done.stderr
