"""Real inputs and outputs: encoded images, raw text, user hooks, labels instead of logits.

Everything is real: JPEG and PNG files written with Pillow (one truncated), a Parquet of
sentences (one null), a tokenizer trained here with `tokenizers`, small ONNX models run by
ONNX Runtime, a real local Ray. Predictions are compared with decoding by Pillow (or
tokenizing with `tokenizers`) and running the model directly. Spec errors come first and
need no Ray; job runs use the module's local Ray, and one runs the CLI as a subprocess.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from tokenizers import Tokenizer

import batch_infer
from batch_infer.data.decode.gpu_codecs import ENV, extensions_folder, load_installed_codecs_only
from batch_infer.data.decode.hooks import first_failing_row
from batch_infer.data.decode.images import (
    GpuDecoders,
    ImageDecode,
    NvImageCodecDecoder,
    PillowDecoder,
    _gpu_here,
    _luma,
    _resize_gpu,
    _rgb_in_place,
    _truncated_jpeg,
    crop_box,
    decode_images,
    decode_processes,
    decoder_for,
    fetch,
    resize_batch,
)
from batch_infer.errors import BackendError, InputError, JobFailedError, SpecError
from batch_infer.planning import build_plan
from jobs.make_examples import (
    SCENES,
    image_model,
    jpeg,
    photo,
    sentence,
    text_model,
    train_tokenizer,
)
from tests.conftest import ROOT, make_table, read_output, run_records

ray_job = pytest.mark.usefixtures("ray_start_regular")
SIZE = 64


# --------------------------------------------------------------------------- data and models


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> Path:
    """24 photos as JPEG (varied sizes, portrait and landscape), 2 as PNG, one truncated
    JPEG, one text file named .jpg; index.parquet names them relative to itself."""
    root = tmp_path_factory.mktemp("images")
    (root / "img").mkdir()
    rng = np.random.default_rng(5)
    rows = []
    for i in range(28):
        w, h = (int(rng.integers(70, 200)), int(rng.integers(70, 200)))
        pixels = photo(rng, w, h)
        if i in (3, 11):
            name = f"img/{i:02d}.png"
            Image.fromarray(pixels).save(root / name)
        else:
            name = f"img/{i:02d}.jpg"
            blob = jpeg(pixels, quality=int(rng.integers(70, 96)))
            if i == 9:
                blob = blob[: len(blob) * 2 // 3]  # truncated
            if i == 17:
                blob = b"this is not an image\n"
            (root / name).write_bytes(blob)
        rows.append((i, name))
    table = pa.table({"id": [r[0] for r in rows], "path": [r[1] for r in rows]})
    pq.write_table(table, root / "index.parquet", row_group_size=10)
    return root


@pytest.fixture(scope="module")
def cnn(tmp_path_factory) -> str:
    """The example's CNN shape with random head weights: uint8 [N, 64, 64, 3] -> logits [N, 4]."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((11, len(SCENES))).astype(np.float32)
    return image_model(tmp_path_factory.mktemp("cnn") / "cnn.onnx", w, np.zeros(4, np.float32))


def pillow_pixels(blob: bytes, size: int = SIZE) -> np.ndarray:
    """The reference, written out with Pillow: shorter side to `size`, centre crop."""
    im = Image.open(io.BytesIO(blob)).convert("RGB")
    w, h = im.size
    rw, rh = (size, int(h * size / w)) if w <= h else (int(w * size / h), size)
    left, top = (rw - size) // 2, (rh - size) // 2
    box = (left * w / rw, top * h / rh, (left + size) * w / rw, (top + size) * h / rh)
    return np.asarray(im.resize((size, size), Image.Resampling.BILINEAR, box=box))


def run_direct(model: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


def image_spec(data: Path, out: Path, model: str, **image: object) -> dict:
    return {
        "name": "images",
        "input": {"path": str(data / "index.parquet")},
        "model": {
            "onnx": model,
            "inputs": {
                "pixels": {"column": "path", "decode": "image", "size": [SIZE, SIZE], **image}
            },
        },
        "shard_rows": 8,
        "max_bad_rows": 2,
        "output": {"path": str(out), "keep_columns": ["id", "path"]},
    }


@pytest.fixture(scope="module")
def sentences(tmp_path_factory) -> tuple[Path, str]:
    """A Parquet of 60 sentences (id 4 null, id 7 long), and a tokenizer trained on them."""
    root = tmp_path_factory.mktemp("text")
    rng = np.random.default_rng(9)
    topics = ["sports", "weather", "food", "tech"]
    texts = [sentence(rng, topics[i % 4]) for i in range(60)]
    texts[7] = " ".join([texts[7]] * 4)  # 32 tokens: longer than max_length 16
    tok_path = root / "tokenizer.json"
    train_tokenizer([t for t in texts], tok_path)
    texts[4] = None
    (root / "data").mkdir()
    pq.write_table(pa.table({"id": np.arange(60), "text": texts}), root / "data" / "p.parquet")
    return root, str(tok_path)


def bag_model(path: Path, vocab: int, length: int | str) -> str:
    rng = np.random.default_rng(4)
    table = rng.standard_normal((vocab, 3)).astype(np.float32)
    return text_model(path, table, np.zeros(3, np.float32), length)  # type: ignore[arg-type]


def text_spec(data: Path, out: Path, model: str, tokenizer: str, **text: object) -> dict:
    form = {"column": "text", "tokenizer": tokenizer, "max_length": 16, **text}
    return {
        "name": "text",
        "input": {"path": str(data)},
        "model": {"onnx": model, "inputs": {"input_ids": form, "attention_mask": form}},
        "shard_rows": 16,
        "max_bad_rows": 2,
        "output": {"path": str(out), "keep_columns": ["id", "text"]},
    }


def errors(out: Path) -> dict[int, str]:
    table = ds.dataset(str(out / "_errors"), format="parquet").to_table()
    return dict(zip(table["id"].to_pylist(), table["_reason"].to_pylist(), strict=True))


def entries(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (out / "_manifest" / "shards").glob("*.json")]


# --------------------------------------------------------------------------- spec errors


def test_image_column_of_numbers_is_a_spec_error(tmp_path, image_files, cnn):
    spec = image_spec(image_files, tmp_path / "out", cnn)
    spec["model"]["inputs"]["pixels"]["column"] = "id"
    with pytest.raises(SpecError) as err:
        batch_infer.run(spec)
    assert str(err.value) == (
        "model.inputs.pixels: column 'id' is int64; an image column holds encoded bytes "
        "(binary, large_binary) or file paths/URIs (string)"
    )
    assert not (tmp_path / "out").exists()


def test_image_size_must_fit_the_model(tmp_path, image_files, cnn):
    spec = image_spec(image_files, tmp_path / "out", cnn, size=[32, 64])
    with pytest.raises(SpecError, match=r"size \[32, 64\], NHWC, RGB makes \[N, 32, 64, 3\], but "):
        build_plan(batch_infer.spec.resolve_spec(spec))
    spec = image_spec(image_files, tmp_path / "out", cnn, dtype="float32")
    with pytest.raises(SpecError, match=r"dtype float32, but model input 'pixels' takes uint8"):
        build_plan(batch_infer.spec.resolve_spec(spec))


def test_tokenizer_file_missing_or_malformed(tmp_path, sentences):
    root, _ = sentences
    model = bag_model(tmp_path / "m.onnx", 200, 16)
    spec = text_spec(root / "data", tmp_path / "out", model, str(tmp_path / "nope.json"))
    with pytest.raises(SpecError) as err:
        batch_infer.run(spec)
    assert str(err.value) == (
        f"model.inputs.input_ids.tokenizer: {tmp_path / 'nope.json'}: no such file"
    )
    (tmp_path / "bad.json").write_text('{"version": "1.0"}')
    spec = text_spec(root / "data", tmp_path / "out", model, str(tmp_path / "bad.json"))
    with pytest.raises(SpecError, match=r"bad\.json: not a tokenizer\.json \("):
        batch_infer.run(spec)
    assert not (tmp_path / "out").exists()


def test_text_input_checks_against_the_model(tmp_path, sentences, image_files):
    root, tokenizer = sentences
    model = bag_model(tmp_path / "m.onnx", 200, 16)
    spec = text_spec(root / "data", tmp_path / "out", model, tokenizer, max_length=32)
    with pytest.raises(SpecError, match=r"set max_length: 16 and padding: max_length"):
        batch_infer.run(spec)
    spec = text_spec(image_files / "index.parquet", tmp_path / "out", model, tokenizer)
    spec["model"]["inputs"]["input_ids"]["column"] = "id"
    with pytest.raises(SpecError, match=r"column 'id' is int64; a text column holds strings"):
        batch_infer.run(spec)


def test_hooks_must_import(tmp_path, models):
    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(make_table(10), data / "f.parquet")
    spec = {
        "name": "hooks",
        "input": {"path": str(data)},
        "model": {"onnx": models["two_io"], "inputs": {}, "preprocess": "tests.nowhere:f"},
        "output": {"path": str(tmp_path / "out")},
    }
    with pytest.raises(SpecError) as err:
        batch_infer.run(spec)
    assert str(err.value).startswith(
        "model.preprocess: 'tests.nowhere:f': cannot import 'tests.nowhere' (ModuleNotFoundError"
    )
    spec["model"]["preprocess"] = "tests.input_hooks:no_such_function"
    with pytest.raises(SpecError, match=r"module 'tests\.input_hooks' has no 'no_such_function'"):
        batch_infer.run(spec)
    spec["model"] |= {"preprocess": None, "inputs": {"seq": "seq", "feat": ["a", "b", "c"]}}
    spec["model"]["postprocess"] = "json:nothing"
    with pytest.raises(SpecError, match=r"^model\.postprocess: 'json:nothing': module 'json' has"):
        batch_infer.run(spec)
    assert not (tmp_path / "out").exists()


def test_labels_must_match_the_classes(tmp_path, image_files, cnn):
    (tmp_path / "labels.txt").write_text("a\nb\nc\n")
    spec = image_spec(image_files, tmp_path / "out", cnn)
    spec["model"]["postprocess"] = {"labels": str(tmp_path / "labels.txt")}
    with pytest.raises(SpecError, match=r"has 3 labels; output 'logits' has 4 classes$"):
        batch_infer.run(spec)
    spec["model"]["postprocess"] = {"top_k": 5}
    with pytest.raises(SpecError, match=r"top_k: 5, but 'logits' has 4 classes"):
        batch_infer.run(spec)


def test_cli_bad_spec_is_one_line_exit_2(tmp_path):
    spec = yaml.safe_load((ROOT / "jobs" / "text.yaml").read_text())
    spec["model"]["inputs"]["input_ids"]["tokenizer"] = "models/missing.tokenizer.json"
    spec["output"]["path"] = str(tmp_path / "out")
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    proc = subprocess.run(
        [sys.executable, "-m", "batch_infer.cli", "run", str(path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: model.inputs.input_ids.tokenizer: {ROOT}/models/missing.tokenizer.json: "
        "no such file"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("key", "value", "line"),
    [
        ("input_ids.max_length", 0, "'model.inputs.input_ids.max_length': Input should be "
         "greater than or equal to 1"),
        ("postprocess.softmax", "maybe", "'model.postprocess.softmax': Input should be a valid "
         "boolean, unable to interpret input"),
        ("postprocess", 7, "'model.postprocess': expected package.module:function or "
         "{softmax, top_k, labels, ...}"),
    ],
)  # fmt: skip
def test_spec_errors_name_the_key_as_written(key: str, value, line: str):
    """A key that takes several forms (a column, a list, an image or a text input; a hook or
    the built-in steps): its errors name the key the user wrote, not pydantic's name for the
    form (`model.inputs.input_ids.text.max_length`), and say it once, not once per form."""
    spec = yaml.safe_load((ROOT / "jobs" / "text.yaml").read_text())
    where = spec["model"] if key.startswith("postprocess") else spec["model"]["inputs"]
    *parents, last = key.split(".")
    for part in parents:
        where = where[part]
    where[last] = value
    with pytest.raises(SpecError) as err:
        batch_infer.spec.resolve_spec(spec)
    assert str(err.value) == f"spec: key {line}"


def test_spec_errors_keep_an_input_named_like_a_form():
    """Model inputs are ONNX names, which may hold spaces: one named as pydantic's tag for a
    form ("text input") stays in the key, the tag after it goes."""
    spec = yaml.safe_load((ROOT / "jobs" / "text.yaml").read_text())
    inputs = spec["model"]["inputs"]
    inputs["text input"] = inputs.pop("input_ids") | {"max_length": 0}
    with pytest.raises(SpecError) as err:
        batch_infer.spec.resolve_spec(spec)
    assert str(err.value) == (
        "spec: key 'model.inputs.text input.max_length': Input should be greater than or equal to 1"
    )


# --------------------------------------------------------------------------- the decoders


def test_resize_taps_are_pillows_to_the_pixel():
    """The GPU decoder's resize arithmetic, run with NumPy: Pillow's own coefficients and
    fixed-point rounding, so equal to Pillow's resize (shrinking, enlarging, both crops)."""
    rng = np.random.default_rng(1)
    for resize in ("shorter_side_crop", "stretch"):
        d = ImageDecode("c", 224, 224, resize, "NHWC", "RGB", "cpu", False)
        for w, h in ((500, 375), (375, 500), (640, 480), (300, 300), (200, 150), (224, 224)):
            im = Image.fromarray(photo(rng, w, h))
            box, ow, oh = crop_box(w, h, d)
            ref = np.asarray(im.resize((ow, oh), Image.Resampling.BILINEAR, box=box))
            got = resize_batch(np.asarray(im)[None], d)[0]
            assert got.shape == ref.shape == (224, 224, 3)
            np.testing.assert_array_equal(got, ref, err_msg=f"{w}x{h} {resize}")


def test_only_interleaved_8_bit_rgb_is_resized_in_place():
    """What the GPU resize reads in place, from a decoded image's CUDA array interface; the
    rest goes back to the CPU (None)."""

    class Decoded:  # what an nvImageCodec Image gives, without a GPU
        def __init__(self, typestr: str, shape: tuple, strides: tuple | None, **more) -> None:
            self.__cuda_array_interface__ = {"typestr": typestr, "shape": shape,
                                             "strides": strides, "data": (4096, False),
                                             **more}  # fmt: skip

    assert _rgb_in_place(Decoded("|u1", (375, 500, 3), None)) == (375, 500, 4096, 1500, None)
    got = _rgb_in_place(Decoded("|u1", (375, 500, 3), (1536, 3, 1), stream=77))
    assert got == (375, 500, 4096, 1536, 77)  # the stream its pixels are written on
    assert _rgb_in_place(Decoded("|u1", (3, 375, 500), (187500, 500, 1))) is None  # planar
    assert _rgb_in_place(Decoded("|u1", (375, 500, 3), (500, 1, 187500))) is None  # planes
    assert _rgb_in_place(Decoded("|u1", (375, 500, 3), (2000, 4, 1))) is None  # 4 bytes apart
    assert _rgb_in_place(Decoded("|u1", (375, 500, 4), None)) is None
    assert _rgb_in_place(Decoded("<u2", (375, 500, 3), None)) is None
    assert _rgb_in_place(None) is None


def test_luma_is_pillows():
    rgb = np.random.default_rng(2).integers(0, 256, (64, 48, 3), np.uint8)
    want = np.asarray(Image.fromarray(rgb).convert("L"))
    np.testing.assert_array_equal(_luma(rgb)[..., 0], want)


def test_decoding_on_processes_equals_decoding_in_place(monkeypatch):
    """The run's own process on a machine with cores to spare decodes on spawned processes,
    in runs of 64 images: the same pixels and the same bad rows, in order."""
    rng = np.random.default_rng(8)
    blobs = [jpeg(photo(rng, 90 + i % 7, 70 + i % 5)) for i in range(150)]
    blobs[100] = blobs[100][:300]
    blobs[20] = None
    column = pa.array(blobs, pa.binary())
    d = ImageDecode("img", SIZE, SIZE, "shorter_side_crop", "NHWC", "RGB", "cpu", False)
    fs = pafs.LocalFileSystem()
    results = {}
    for procs in ("0", "2"):
        monkeypatch.setenv("BATCH_INFER_DECODE_PROCESSES", procs)
        results[procs] = decode_images(column, d, fs, "/")
    (here, bad_here, how_here), (there, bad_there, how_there) = results.values()
    np.testing.assert_array_equal(here, there)
    assert bad_here == bad_there and sorted(bad_here) == [20, 100]
    assert bad_here[20] == "img: null"
    assert bad_here[100] == "img: not a decodable image (Truncated File Read)"
    assert how_there == how_here + " (2 processes)"
    # a retry (after the GPU decoder) fills only the rows it is given, here or there
    for procs in ("0", "2"):
        monkeypatch.setenv("BATCH_INFER_DECODE_PROCESSES", procs)
        out = np.full_like(here, 7)
        again = [b if i % 3 == 1 else None for i, b in enumerate(blobs)]  # 100 among them
        assert PillowDecoder().decode(again, d, out) == {100: bad_here[100][5:]}
        done = [i for i in range(150) if i % 3 == 1 and i != 100]
        assert (np.delete(out, done, axis=0) == 7).all()
        np.testing.assert_array_equal(out[done], here[done])
    want = np.stack([pillow_pixels(b) if b and i != 100 else np.zeros_like(here[0])
                     for i, b in enumerate(blobs)])  # fmt: skip
    np.testing.assert_array_equal(here, want)


def test_undecodable_images_have_the_same_reason_in_every_run(monkeypatch):
    """Pillow's "cannot identify image file <_io.BytesIO object at 0x7f...>" named a buffer's
    address, so `GROUP BY _reason` over the errors split one cause into a row per image."""
    monkeypatch.setenv("BATCH_INFER_DECODE_PROCESSES", "0")
    good = jpeg(photo(np.random.default_rng(3), 40, 30))
    column = pa.array([b"", b"hello", b"\x00" * 64, good, b"GIF89a" + b"\x00" * 10], pa.binary())
    d = ImageDecode("img", SIZE, SIZE, "shorter_side_crop", "NHWC", "RGB", "cpu", False)
    _, reasons, _ = decode_images(column, d, pafs.LocalFileSystem(), "/")
    unknown = "img: not a decodable image (not in a format Pillow knows)"
    assert reasons == {
        0: "img: empty (0 bytes)",
        1: unknown,
        2: unknown,
        4: reasons[4],
    }
    assert reasons[4].startswith("img: not a decodable image (") and "0x" not in reasons[4]


def test_image_files_empty_missing_or_folders_are_bad_rows_that_say_so(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "good.jpg").write_bytes(b"anything")
    (tmp_path / "folder.jpg").mkdir()
    column = pa.array(["empty.jpg", "good.jpg", "gone.jpg", "", "folder.jpg", "foo://x/y.jpg"])
    data, reasons = fetch(column, True, pafs.LocalFileSystem(), str(tmp_path))
    assert data == [None, b"anything", None, None, None, None]
    assert reasons == {
        0: "empty file 'empty.jpg'",
        2: "no such file 'gone.jpg'",
        3: "empty path",
        4: "'folder.jpg' is a folder, not a file",
        5: "not a path or URI that can be read: 'foo://x/y.jpg' (Unrecognized filesystem "
        "type in URI: foo://x)",
    }


def test_a_store_that_cannot_be_reached_fails_the_shard_not_its_rows(tmp_path):
    """Every row of a bucket behind a network or credentials problem was a bad row, and its
    shard committed: a rerun after the fix skipped them. Now the shard fails (nothing of it
    committed) and a rerun reads it again. The URI's options (an S3-compatible store's
    endpoint) reach the store: they were dropped."""
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (tmp_path / "good.jpg").write_bytes(jpeg(photo(np.random.default_rng(1), 40, 30)))
    uri = f"s3://bucket/x.jpg?endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
    column = pa.array(["good.jpg", uri])
    d = ImageDecode("img", SIZE, SIZE, "shorter_side_crop", "NHWC", "RGB", "cpu", True)
    with pytest.raises(InputError) as err:
        decode_images(column, d, pafs.LocalFileSystem(), str(tmp_path))
    assert str(err.value).startswith(f"img: cannot read {uri!r} (")
    assert f"127.0.0.1:{port}" in str(err.value).split("(", 1)[1]  # the store it was sent to


def test_decoding_while_another_thread_imports_ray(monkeypatch):
    """The run's own process decodes its first shards while its Ray thread is still
    importing Ray: a half-imported `ray` module (no attributes yet) must not stop it, as it
    did on the H100 (AttributeError: partially initialized module 'ray')."""
    import types

    monkeypatch.delenv("BATCH_INFER_DECODE_PROCESSES", raising=False)
    monkeypatch.setitem(sys.modules, "ray", types.ModuleType("ray"))
    monkeypatch.setattr(os, "cpu_count", lambda: 16)  # as on the H100 machine
    assert decode_processes() == 14


def test_image_bytes_are_views_of_the_column():
    """Bytes in a column reach the decoders as views of the column's buffer (no copy per
    image): the same bytes as to_pylist for binary and large_binary, sliced, with nulls and
    empty values; a JPEG is truncated when its end marker is missing, zero padding aside."""
    values = [b"\xff\xd8abc\xff\xd9", None, b"", b"\xff\xd8x\xff\xd9" + b"\0" * 100, b"zz"]
    for t in (pa.binary(), pa.large_binary()):
        for column in (pa.array(values, t), pa.array([b"pad", *values], t).slice(1)):
            data, reasons = fetch(column, False, pafs.LocalFileSystem(), "/")
            assert all(isinstance(v, memoryview) for v in data if v is not None)
            assert [None if v is None else bytes(v) for v in data] == [
                None if i in (1, 2) else v for i, v in enumerate(values)
            ]
            assert reasons == {1: "null", 2: "empty (0 bytes)"}
    complete, cut = values[0], values[0][:-1]
    assert not _truncated_jpeg(memoryview(complete)) and _truncated_jpeg(memoryview(cut))
    assert not _truncated_jpeg(values[3]) and _truncated_jpeg(cut + b"\0" * 100)
    assert not _truncated_jpeg(b"\x89PNG no end marker needed")


@pytest.mark.skipif(_gpu_here() is not None, reason="this machine has a GPU decoder")
def test_no_gpu_here_means_pillow_and_gpu_demanded_is_refused():
    decoder, why = decoder_for("auto")
    assert decoder.name == "pillow" and why == "no GPU visible to this process"
    with pytest.raises(BackendError, match=r"image decode device: gpu, but no GPU visible"):
        decoder_for("gpu")


def test_a_gpu_decoder_installed_but_broken_is_a_warning(monkeypatch, caplog, tmp_path):
    """On a GPU with nvImageCodec installed, a decoder that cannot start leaves the run to
    Pillow, many times slower: that is said without -v. Not installed, it is not news."""
    from batch_infer.data.decode import images

    def cannot_start(device: int) -> None:
        raise RuntimeError("nvImageCodec: no hardware decoder")

    monkeypatch.setattr(images, "_gpu_here", lambda: 0)
    monkeypatch.setattr(images, "GpuDecoders", cannot_start)
    for installed, level in ((tmp_path, "WARNING"), (None, "INFO")):
        monkeypatch.setattr(images, "_decoders", {})
        monkeypatch.setattr(images, "nvimgcodec_package", lambda i=installed: i)
        caplog.clear()
        with caplog.at_level("INFO", logger="batch_infer"):
            decoder, why = decoder_for("auto")
        assert decoder.name == "pillow"
        assert why == "nvImageCodec unusable here (RuntimeError: nvImageCodec: no hardware decoder)"
        assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
            (level, f"image decoder: {decoder.describe()} ({why})")
        ]


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_here() is None, reason="needs a GPU, nvImageCodec and CuPy")
def test_gpu_decoders_are_made_on_demand_up_to_the_limit(monkeypatch, image_files):
    """Shards decoding at once each take a decoder of their own, made when none is free, but
    never more than BATCH_INFER_GPU_DECODERS; each decodes what one decoder alone does."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setenv("BATCH_INFER_GPU_DECODERS", "2")
    paths = pq.read_table(image_files / "index.parquet")["path"].to_pylist()
    blobs = [(image_files / p).read_bytes() for p in paths]
    d = ImageDecode("img", SIZE, SIZE, "shorter_side_crop", "NHWC", "RGB", "gpu", False)
    pool = GpuDecoders(0)
    assert pool.made == 1

    def decode(_: int) -> tuple[np.ndarray, dict[int, str]]:
        out = np.zeros((len(blobs), SIZE, SIZE, 3), np.uint8)
        return out, pool.decode(blobs, d, out)

    with ThreadPoolExecutor(6) as threads:
        results = list(threads.map(decode, range(12)))
    assert pool.made == 2 and pool.free.qsize() == 2
    want, retry = results[0]
    for out, again in results[1:]:
        assert again == retry
        np.testing.assert_array_equal(out, want)


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_here() is None, reason="needs a GPU, nvImageCodec and CuPy")
def test_gpu_resize_equals_the_numpy_reference_to_the_pixel():
    """The GPU resize reads each decoded image in place, by its own address and row pitch. On
    the same pixels it equals resize_batch (of _luma's for L) exactly: each image in an
    allocation of its own with its own padding after each row, handed over out of order,
    landscape and portrait (whose crop leaves rows unread), a large one (long tap loops),
    both resizes, RGB and L, one cache of taps throughout."""
    import cupy as cp

    rng = np.random.default_rng(3)
    cache: dict = {}
    for resize in ("shorter_side_crop", "stretch"):
        for channels in ("RGB", "L"):
            d = ImageDecode("c", 224, 224, resize, "NHWC", channels, "gpu", False)
            for w, h in ((500, 375), (375, 500), (200, 150), (1000, 1400)):
                rgb = np.stack([photo(rng, w, h) for _ in range(4)])
                held, where = [], []
                for k in (2, 0, 3, 1):  # out of order, each apart, padded by 0, 5, 64, 333
                    pad = (0, 5, 64, 333)[k]
                    image = cp.zeros((h, w * 3 + pad), cp.uint8)
                    image[:, : w * 3] = cp.asarray(rgb[k].reshape(h, w * 3))
                    held.append(image)
                    where.append((image.data.ptr, image.strides[0]))
                got = _resize_gpu(where, h, w, d, cache).get()
                want = resize_batch(_luma(rgb) if channels == "L" else rgb, d)[[2, 0, 3, 1]]
                np.testing.assert_array_equal(got, want, err_msg=f"{w}x{h} {resize} {channels}")


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_here() is None, reason="needs a GPU, nvImageCodec and CuPy")
def test_gpu_decoder_is_within_two_levels_of_pillow(image_files):
    """On the GPU machine (python -m pytest -m gpu tests/test_inputs.py): nvImageCodec and
    the GPU resize against Pillow; what it cannot decode (PNG, corrupt files) it hands back
    to be retried on the CPU, and decode_images says so."""
    paths = pq.read_table(image_files / "index.parquet")["path"].to_pylist()
    blobs = [(image_files / p).read_bytes() for p in paths]
    d = ImageDecode("img", SIZE, SIZE, "shorter_side_crop", "NHWC", "RGB", "gpu", False)
    out = np.zeros((len(blobs), SIZE, SIZE, 3), np.uint8)
    retry = NvImageCodecDecoder(0).decode(blobs, d, out)
    assert {9, 17} <= set(retry) <= {3, 9, 11, 17}  # corrupt always; PNG where no GPU codec
    done = [i for i in range(len(blobs)) if i not in retry]
    want = np.stack([pillow_pixels(blobs[i]) for i in done])
    assert np.abs(out[done].astype(int) - want).max() <= 2
    pixels, bad, how = decode_images(pa.array(blobs, pa.binary()), d, pafs.LocalFileSystem(), "/")
    assert sorted(bad) == [9, 17] and how.startswith("nvImageCodec")
    np.testing.assert_array_equal(pixels[done], out[done])


def test_gpu_codecs_folder_leaves_out_extensions_whose_library_is_missing(tmp_path, monkeypatch):
    """nvImageCodec's package as its wheel lays it out, without nvJPEG2000's and nvTIFF's
    wheels: their extensions are left out of a folder laid out as the package, whose links
    `$ORIGIN/..` and `$ORIGIN/../../cu13/lib` still resolve; made once, never half."""
    site = tmp_path / "site" / "nvidia"
    package = site / "nvimgcodec"
    (package / "extensions").mkdir(parents=True)
    for name in ("libnvjpeg_ext", "libnvjpeg2k_ext", "libnvtiff_ext", "libopencv_ext"):
        (package / "extensions" / f"{name}.so.0.9.0").write_bytes(b"")
    (package / "libnvimgcodec.so.0").write_bytes(b"")
    (site / "cu13" / "lib").mkdir(parents=True)
    cache = tmp_path / "cache"

    folder = extensions_folder(package, cache)
    assert folder is not None
    assert sorted(p.name for p in folder.iterdir()) == [
        "libnvjpeg_ext.so.0.9.0",
        "libopencv_ext.so.0.9.0",
    ]
    assert (folder / "libnvjpeg_ext.so.0.9.0").resolve() == (
        package / "extensions" / "libnvjpeg_ext.so.0.9.0"
    )
    assert (folder / ".." / "libnvimgcodec.so.0").resolve() == package / "libnvimgcodec.so.0"
    assert (folder / ".." / ".." / "cu13" / "lib").resolve() == site / "cu13" / "lib"
    assert extensions_folder(package, cache) == folder
    assert [p.name for p in cache.iterdir()] == [folder.parent.parent.name]  # no draft left

    (site / "nvjpeg2k" / "lib").mkdir(parents=True)  # nvJPEG2000's wheel installed
    (site / "nvjpeg2k" / "lib" / "libnvjpeg2k.so.0").write_bytes(b"")
    with_j2k = extensions_folder(package, cache)
    assert with_j2k is not None and with_j2k != folder
    assert "libnvjpeg2k_ext.so.0.9.0" in {p.name for p in with_j2k.iterdir()}
    (site / "nvtiff" / "lib").mkdir(parents=True)
    (site / "nvtiff" / "lib" / "libnvtiff.so.0").write_bytes(b"")
    assert extensions_folder(package, cache) is None  # nothing missing: nvImageCodec's own

    monkeypatch.setenv(ENV, "/the/users/choice")
    load_installed_codecs_only(cache)
    assert os.environ[ENV] == "/the/users/choice"


# A fresh process's GPU decoder given the JPEG at argv[1]: the GPU tests that read what a
# new process does (its log, its decoded pixels in `out`).
DECODE_ONE_ON_GPU = (
    "import sys, numpy as np; from pathlib import Path\n"
    "from batch_infer.data.decode.images import ImageDecode, NvImageCodecDecoder\n"
    f"d = ImageDecode('img', {SIZE}, {SIZE}, 'shorter_side_crop', 'NHWC', 'RGB', 'gpu', False)\n"
    "blob = Path(sys.argv[1]).read_bytes()\n"
    f"out = np.zeros((1, {SIZE}, {SIZE}, 3), np.uint8)\n"
    "assert NvImageCodecDecoder(0).decode([blob], d, out) == {}\n"
)


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_here() is None, reason="needs a GPU, nvImageCodec and CuPy")
def test_gpu_decoder_log_has_no_errors_of_codecs_not_installed(image_files):
    """A fresh process's GPU decoder loads no extension whose library is missing, so its
    log has none of nvImageCodec's `Failed to load ...` errors, and it decodes as before."""
    script = DECODE_ONE_ON_GPU + "np.save(sys.argv[2], out[0])\n"
    env = {k: v for k, v in os.environ.items() if k != ENV}
    saved = image_files / "decoded.npy"
    done = subprocess.run(
        [sys.executable, "-c", script, str(image_files / "img" / "00.jpg"), str(saved)],
        env=env, capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "Failed to load" not in done.stdout + done.stderr
    assert "[ERROR]" not in done.stdout + done.stderr
    want = pillow_pixels((image_files / "img" / "00.jpg").read_bytes())
    assert np.abs(np.load(saved).astype(int) - want).max() <= 2


@pytest.mark.gpu
@pytest.mark.skipif(_gpu_here() is None, reason="needs a GPU, nvImageCodec and CuPy")
def test_gpu_decoder_gives_whole_batches_to_the_hardware_decoder(image_files):
    """nvImageCodec fixes the hardware JPEG decoder's share of every batch from the
    decoder's first batch. A new decoder's first real batch is small (the warm-up's one
    image, a shard's first piece), so the decoder must set that share to a whole batch when
    it is made: nvImageCodec's log then names a hardware batch of at least BATCH."""
    script = DECODE_ONE_ON_GPU
    done = subprocess.run(
        [sys.executable, "-c", script, str(image_files / "img" / "00.jpg")],
        env={**os.environ, "PYNVIMGCODEC_VERBOSITY": "3"},
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    engines = re.search(r"HW decoder available num_hw_engines=(\d+)", log)
    if engines is None or int(engines.group(1)) == 0:
        pytest.skip("this GPU has no hardware JPEG decoder")
    shares = [
        int(n)
        for n in re.findall(
            r"nvjpeg_hw_decoder (?:selecting max batch size to|Using previous max batch size"
            r" of) (\d+)",
            log,
        )
    ]
    assert shares, log[-4000:]
    assert min(shares) >= NvImageCodecDecoder.BATCH, shares


def test_a_postprocess_column_arrow_cannot_hold_is_the_hooks_error():
    """Once an unexpected error, retried three times and named without the hook; so were
    lists of a different length per row, which Arrow holds."""
    from batch_infer.data.postprocess import Hook, hook_columns
    from batch_infer.errors import HookError

    outputs = {"score": np.zeros((3, 1), np.float32)}
    with pytest.raises(HookError) as err:
        hook_columns(Hook("tests.input_hooks:python_objects"), outputs, 3, "shard s", int)
    assert str(err.value).startswith(
        "postprocess hook tests.input_hooks:python_objects on shard s: 'thing': not a Parquet "
        "column (ArrowInvalid: Could not convert <object object at"
    )
    ((name, column),) = hook_columns(Hook("tests.input_hooks:ragged"), outputs, 3, "s", int)
    assert name == "ks" and column.to_pylist() == [[], [0], [0, 1]]


def test_first_failing_row_bisects():
    for bad_from in (0, 1, 7, 99):
        calls: list[int] = []

        def hook(k: int, bad_from: int = bad_from, calls: list[int] = calls) -> None:
            calls.append(k)
            if k > bad_from:
                raise ValueError

        assert first_failing_row(hook, 100) == bad_from
        assert len(calls) <= 8


# --------------------------------------------------------------------------- job runs


@ray_job
def test_image_job_equals_pillow_and_direct_onnxruntime(tmp_path, image_files, cnn):
    out = tmp_path / "out"
    summary = batch_infer.run(image_spec(image_files, out, cnn))
    assert summary.status == "succeeded" and summary.rows == 28 and summary.bad_rows == 2
    bad = errors(out)
    assert sorted(bad) == [9, 17]
    assert bad[9].startswith("path: not a decodable image (image file is truncated")
    assert bad[17] == "path: not a decodable image (not in a format Pillow knows)"
    output = read_output(out).sort_by("id")
    ids = output["id"].to_pylist()
    assert ids == [i for i in range(28) if i not in bad]  # every row once, here or in _errors
    pixels = np.stack(
        [pillow_pixels((image_files / p).read_bytes()) for p in output["path"].to_pylist()]
    )
    ref = run_direct(cnn, {"pixels": pixels})
    np.testing.assert_array_equal(np.stack(output["logits"].to_pylist()), ref)
    assert {e["preprocess"] for e in entries(out)} == {
        f"pixels: Pillow {Image.__version__} on the CPU"
    }
    # the same images as bytes in a column, as absolute paths and as file:// URIs: the same
    # predictions; one more row names a file that is not there (its bytes: a null)
    table = pq.read_table(image_files / "index.parquet")
    paths = [str(image_files / p) for p in table["path"].to_pylist()] + [str(tmp_path / "gone.jpg")]
    blobs = [Path(p).read_bytes() for p in paths[:-1]] + [None]
    (tmp_path / "bytes").mkdir()
    variants = pa.table(
        {
            "id": list(range(29)),
            "path": paths,
            "uri": [Path(p).as_uri() for p in paths],
            "image": pa.array(blobs, pa.large_binary()),
        }
    )
    pq.write_table(variants, tmp_path / "bytes" / "index.parquet")
    missing = {
        "image": "image: null",
        "path": f"path: no such file {paths[-1]!r}",
        "uri": f"uri: no such file {Path(paths[-1]).as_uri()!r}",
    }
    for column, reason in missing.items():
        spec = image_spec(tmp_path / "bytes", tmp_path / f"out-{column}", cnn, column=column)
        spec["max_bad_rows"] = 3
        batch_infer.run(spec)
        again = read_output(tmp_path / f"out-{column}").sort_by("id")
        assert again["logits"].to_pylist() == output["logits"].to_pylist()
        bad = errors(tmp_path / f"out-{column}")
        assert sorted(bad) == [9, 17, 28] and bad[28] == reason


def test_inputs_warm_up_readies_once_and_only_when_started(tmp_path, sentences):
    """The warm-up a local run starts beside its model's load: not started (Ray's actors do
    the work), it adds nothing to the lane's stats; started (a second start does nothing), it
    readies the tokenizer and says when, and leaving the block waits for it."""
    import time

    from batch_infer.data.decode import InputsWarmUp

    root, tokenizer = sentences
    model = bag_model(tmp_path / "m.onnx", 200, 16)
    spec = text_spec(root / "data", tmp_path, model, tokenizer)
    plan = build_plan(batch_infer.spec.resolve_spec(spec))
    assert plan.decoded
    with InputsWarmUp(plan.decoded) as idle:
        pass
    assert idle.times() == {} and idle.ready_at is None
    before = time.time()
    with InputsWarmUp(plan.decoded) as inputs:
        inputs.start()
        inputs.start()
    (ready,) = inputs.times().values()
    assert ready is not None and before <= ready <= time.time()
    inputs.close()  # again: returns at once


def test_a_local_run_readies_its_decoders_before_its_device_is_found(tmp_path, image_files, cnn):
    """A local run readies its image decoders from when its plan is made, not once its device
    is found and its lane starts (a GPU's start and ONNX Runtime's import take a second
    there: here the finding is made a second slower), and its lane's stats say when. Its own
    process, no Ray: on the CPU that process is the whole run."""
    spec = {**image_spec(image_files, tmp_path / "out", cnn), "device": "cpu"}
    script = f"""
import json, time
import batch_infer.job as job
found = job.prepare_local
def slowly(*args):
    time.sleep(1.0)
    return found(*args)
job.prepare_local = slowly
print(json.dumps(job.run({spec!r}).actor_stats))
"""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a run of its own
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr
    (stats,) = json.loads(done.stdout.splitlines()[-1])
    assert stats["node"] == "driver"
    assert 0 <= stats["inputs_ready_at"] < stats["loading_at"] - 0.5  # Pillow: at once
    assert stats["loading_at"] <= stats["ready_at"] <= stats["first_batch_at"]
    (record,) = run_records(tmp_path / "out")
    assert record["rows"] == 28 and record["actor_stats"] == [stats]


@ray_job
def test_image_layouts_channels_and_stretch(tmp_path, image_files):
    """NCHW, BGR, gray, stretch and float32 each give what Pillow gives, through an
    Identity model."""
    import onnx
    from onnx import TensorProto, helper

    blobs = [
        (image_files / p).read_bytes()
        for p in pq.read_table(image_files / "index.parquet")["path"].to_pylist()
    ]
    cases = {
        "nchw": (
            {"layout": "NCHW"},
            [3, SIZE, SIZE],
            lambda b: pillow_pixels(b).transpose(2, 0, 1),
        ),
        "bgr": ({"channels": "BGR"}, [SIZE, SIZE, 3], lambda b: pillow_pixels(b)[..., ::-1]),
        "gray": (
            {"channels": "L", "size": [SIZE, 48], "resize": "stretch"},
            [SIZE, 48, 1],
            lambda b: np.asarray(
                Image.open(io.BytesIO(b)).convert("L").resize((48, SIZE), Image.Resampling.BILINEAR)
            )[..., None],
        ),
        "float": (
            {"dtype": "float32"},
            [SIZE, SIZE, 3],
            lambda b: pillow_pixels(b).astype(np.float32),
        ),
    }
    for name, (form, shape, reference) in cases.items():
        elem = TensorProto.FLOAT if name == "float" else TensorProto.UINT8
        graph = helper.make_graph(
            [helper.make_node("Identity", ["pixels"], ["out"])],
            "identity",
            [helper.make_tensor_value_info("pixels", elem, ["N", *shape])],
            [helper.make_tensor_value_info("out", elem, ["N", *shape])],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        onnx.save(model, tmp_path / f"{name}.onnx")
        spec = image_spec(image_files, tmp_path / name, str(tmp_path / f"{name}.onnx"), **form)
        batch_infer.run(spec)
        output = read_output(tmp_path / name).sort_by("id")
        got = np.asarray(output["out"].to_pylist())
        want = np.stack([reference(blobs[i]) for i in output["id"].to_pylist()])
        leaf = output.schema.field("out").type
        while pa.types.is_fixed_size_list(leaf):
            leaf = leaf.value_type
        assert leaf == pa.from_numpy_dtype(want.dtype)
        np.testing.assert_array_equal(got, want)


@ray_job
def test_text_job_equals_tokenizers_and_direct_onnxruntime(tmp_path, sentences):
    root, tokenizer = sentences
    tok = Tokenizer.from_file(tokenizer)
    model = bag_model(tmp_path / "m.onnx", tok.get_vocab_size(), 16)
    out = tmp_path / "out"
    summary = batch_infer.run(text_spec(root / "data", out, model, tokenizer))
    assert summary.rows == 60 and summary.bad_rows == 1
    assert errors(out) == {4: "text: null"}
    output = read_output(out).sort_by("id")
    assert output["id"].to_pylist() == [i for i in range(60) if i != 4]
    tok.enable_truncation(16)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), length=16)
    enc = tok.encode_batch(output["text"].to_pylist())
    feeds = {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
    }
    np.testing.assert_array_equal(np.stack(output["logits"].to_pylist()), run_direct(model, feeds))
    assert {e["preprocess"] for e in entries(out)} == {
        f"text: tokenizers {__import__('tokenizers').__version__}"
    }


@ray_job
def test_text_without_truncation_and_padded_to_the_longest(tmp_path, sentences):
    root, tokenizer = sentences
    tok = Tokenizer.from_file(tokenizer)
    model = bag_model(tmp_path / "m.onnx", tok.get_vocab_size(), "L")  # dynamic length
    out = tmp_path / "out"
    spec = text_spec(root / "data", out, model, tokenizer, truncation=False, padding="longest")
    batch_infer.run(spec)
    long = len(tok.encode(pq.read_table(root / "data")["text"][7].as_py()).ids)
    assert long == 32  # 4 x (7 words and a full stop)
    assert errors(out) == {4: "text: null", 7: "text: 32 tokens, more than max_length 16"}
    output = read_output(out).sort_by("id")
    assert len(output) == 58
    for row in output.to_pylist()[:10]:  # one text at a time: padding must not matter
        enc = tok.encode(row["text"])
        feeds = {
            "input_ids": np.array([enc.ids], np.int64),
            "attention_mask": np.array([enc.attention_mask], np.int64),
        }
        np.testing.assert_allclose(row["logits"], run_direct(model, feeds)[0], rtol=1e-5)


@ray_job
def test_preprocess_and_postprocess_hooks(tmp_path, models):
    data = tmp_path / "in"
    data.mkdir()
    table = make_table(60)
    pq.write_table(table, data / "f.parquet", row_group_size=20)
    out = tmp_path / "out"
    spec = {
        "name": "hooks",
        "input": {"path": str(data)},
        "model": {
            "onnx": models["two_io"],
            "inputs": {},
            "preprocess": "tests.input_hooks:seq_feat",
            "postprocess": "tests.input_hooks:emb_norm",
        },
        "shard_rows": 20,
        "max_bad_rows": 60,
        "output": {"path": str(out), "keep_columns": ["id"]},
    }
    batch_infer.run(spec)
    b = table["b"].to_numpy()
    assert errors(out) == {i: f"preprocess: b is {b[i]} (negative)" for i in range(60) if b[i] < 0}
    output = read_output(out).sort_by("id")
    assert output.column_names == ["id", "emb_norm", "positive"]
    good = table.filter(pa.array(b >= 0))
    assert output["id"].to_pylist() == good["id"].to_pylist()
    sess = ort.InferenceSession(models["two_io"], providers=["CPUExecutionProvider"])
    seq = np.stack(good["seq"].to_pylist()).astype(np.float32)
    feat = np.column_stack([good[c].to_numpy().astype(np.float32) for c in "abc"])
    emb, score = sess.run(["emb", "score"], {"seq": seq, "feat": feat})
    np.testing.assert_allclose(output["emb_norm"].to_numpy(), np.linalg.norm(emb, axis=1), 1e-5)
    assert output["positive"].to_pylist() == (score[:, 0] > 0).tolist()


@ray_job
def test_a_hook_that_raises_names_hook_shard_and_row(tmp_path, models):
    data = tmp_path / "in"
    data.mkdir()
    pq.write_table(make_table(40), data / "f.parquet", row_group_size=10)
    out = tmp_path / "out"
    spec = {
        "name": "hooks",
        "input": {"path": str(data)},
        "model": {
            "onnx": models["two_io"],
            "inputs": {},
            "preprocess": "tests.input_hooks:fails_on_id_13",
        },
        "shard_rows": 10,
        "max_retries": 0,
        "output": {"path": str(out), "keep_columns": ["id"]},
    }
    with pytest.raises(JobFailedError) as err:
        batch_infer.run(spec)
    run = json.loads(next((out / "_runs").glob("*.json")).read_text())
    (message,) = run["errors"]
    assert "preprocess hook tests.input_hooks:fails_on_id_13 failed on shard " in message
    assert "(f.parquet), first at row 13: ValueError: cannot handle id 13 (at index 3)" in message
    assert str(err.value).startswith("1 shard(s) failed; the 3 committed shard(s) are kept")
    assert message in str(err.value)
    # the other shards were committed; nothing of the failing one
    assert sorted(read_output(out)["id"].to_pylist()) == [i for i in range(40) if not 10 <= i < 20]
    assert not (out / "_errors").exists() or errors(out) == {}

    spec["model"] |= {
        "inputs": {"seq": "seq", "feat": ["a", "b", "c"]},
        "preprocess": None,
        "postprocess": "tests.input_hooks:fails_on_large_score",
    }
    with pytest.raises(JobFailedError):
        batch_infer.run(spec, overwrite=True)
    table = make_table(40)
    score = table_scores(models["two_io"], table)
    failing = {i // 10 for i in np.flatnonzero(score > 5)}
    assert 0 < len(failing) < 4  # some shards fail, some are committed
    run = max(
        (json.loads(p.read_text()) for p in (out / "_runs").glob("*.json")),
        key=lambda r: r["started_at"],
    )
    first = int(np.flatnonzero(score > 5)[0])
    assert any(
        "postprocess hook tests.input_hooks:fails_on_large_score failed on shard " in m
        and f"first at row {first}: RuntimeError: score above 5" in m
        for m in run["errors"]
    )
    committed = {i // 10 for i in read_output(out)["id"].to_pylist()}
    assert committed == set(range(4)) - failing


def table_scores(model: str, table: pa.Table) -> np.ndarray:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    seq = np.stack(table["seq"].to_pylist()).astype(np.float32)
    feat = np.column_stack([table[c].to_numpy().astype(np.float32) for c in "abc"])
    return sess.run(["score"], {"seq": seq, "feat": feat})[0][:, 0]


@ray_job
def test_builtin_postprocess_labels_scores_top_k(tmp_path, image_files, cnn):
    (tmp_path / "labels.txt").write_text("\n".join(SCENES) + "\n")
    out = tmp_path / "out"
    spec = image_spec(image_files, out, cnn)
    spec["model"]["postprocess"] = {
        "softmax": True,
        "top_k": 3,
        "labels": str(tmp_path / "labels.txt"),
        "keep_outputs": True,
    }
    batch_infer.run(spec)
    output = read_output(out).sort_by("id")
    assert output.column_names == [
        "id",
        "path",
        "logits",
        "label",
        "score",
        "top_labels",
        "top_scores",
    ]
    logits = np.stack(output["logits"].to_pylist())
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :3]
    assert output["label"].to_pylist() == [SCENES[i] for i in order[:, 0]]
    assert output["top_labels"].to_pylist() == [[SCENES[i] for i in row] for row in order]
    np.testing.assert_allclose(output["score"].to_numpy(), probs.max(1), rtol=1e-5)
    np.testing.assert_allclose(
        np.stack(output["top_scores"].to_pylist()), np.take_along_axis(probs, order, 1), rtol=1e-5
    )
    # argmax without labels: the class index and the raw score
    out2 = tmp_path / "argmax"
    spec = image_spec(image_files, out2, cnn)
    spec["model"]["postprocess"] = {}
    batch_infer.run(spec)
    output2 = read_output(out2).sort_by("id")
    assert output2.column_names == ["id", "path", "label", "score"]
    assert output2["label"].to_pylist() == logits.argmax(1).tolist()
    np.testing.assert_allclose(output2["score"].to_numpy(), logits.max(1))
    # a run that has committed nothing yet: `query` knows the columns from job.json
    for done, fresh in ((out, tmp_path / "fresh"), (out2, tmp_path / "fresh2")):
        (fresh / "_manifest").mkdir(parents=True)
        shutil.copy(done / "_manifest" / "job.json", fresh / "_manifest")
        have = batch_infer.query(done, "SELECT * FROM predictions").schema
        empty = batch_infer.query(fresh, "SELECT * FROM predictions")
        assert empty.num_rows == 0 and empty.column_names == have.names
        assert [empty.schema.field(c).type for c in ("label", "score")] == [
            have.field(c).type for c in ("label", "score")
        ]


def test_cli_decoding_on_processes_exits_clean(tmp_path, image_files, cnn):
    """A run whose images Pillow decoded on a pool of processes leaves no semaphores behind
    (the CLI ends with os._exit; Python's resource tracker would report them as leaked)."""
    paths = pq.read_table(image_files / "index.parquet")["path"].to_pylist()
    data = tmp_path / "in"
    data.mkdir()
    table = pa.table({"id": list(range(len(paths) * 10)),
                      "path": [str(image_files / p) for p in paths] * 10})  # fmt: skip
    pq.write_table(table, data / "index.parquet")
    spec = image_spec(data, tmp_path / "out", cnn) | {"shard_rows": 200, "max_bad_rows": 20}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "batch_infer.cli", "run", str(tmp_path / "job.yaml"), "-q"],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
        env=env | {"BATCH_INFER_DECODE_PROCESSES": "2"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "processes" in " ".join(e["preprocess"] for e in entries(tmp_path / "out"))
    assert "leaked" not in proc.stderr, proc.stderr
    bad = {i + k * len(paths) for i in (9, 17) for k in range(10)}
    assert set(errors(tmp_path / "out")) == bad
    assert len(read_output(tmp_path / "out")) + len(bad) == len(table)


def test_cli_runs_the_shipped_examples(tmp_path):
    """`python -m batch_infer.cli run` on jobs/images.yaml and jobs/text.yaml (no Ray of the
    test's: the run's own process does the work), exactly once, bad rows in _errors/."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    for job, bad, rows in (("images", {7}, 32), ("text", {5}, 48)):
        out = tmp_path / job
        proc = subprocess.run(
            [sys.executable, "-m", "batch_infer.cli", "run", f"jobs/{job}.yaml", "-q",
             "--set", f"output.path={out}"],
            cwd=ROOT, capture_output=True, text=True, timeout=240, env=env,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        output = read_output(out)
        assert set(errors(out)) == bad
        assert sorted(output["id"].to_pylist() + sorted(bad)) == list(range(rows))
        assert np.mean(np.array(output["label"].to_pylist()) == output["truth"].to_numpy()) > 0.9
