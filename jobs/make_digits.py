"""Regenerate the quickstart's shipped files: data/digits/ and models/digits.onnx.

Needs scikit-learn (`pip install -e ".[examples]"`). Uses its bundled digits (no download),
trains a small MLP and writes it to ONNX by hand: scaling, two dense layers, and an ArgMax
so the output has both `logits` and `predicted`.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper
from sklearn.datasets import load_digits
from sklearn.neural_network import MLPClassifier


def digits_model(clf: MLPClassifier) -> onnx.ModelProto:
    (w1, w2), (b1, b2) = clf.coefs_, clf.intercepts_
    inits = [
        numpy_helper.from_array(np.array(16.0, np.float32), "scale"),
        numpy_helper.from_array(w1.astype(np.float32), "w1"),
        numpy_helper.from_array(b1.astype(np.float32), "b1"),
        numpy_helper.from_array(w2.astype(np.float32), "w2"),
        numpy_helper.from_array(b2.astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Div", ["pixels", "scale"], ["x"], name="scale_pixels"),
        helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="dense1"),
        helper.make_node("Relu", ["h"], ["hr"], name="relu1"),
        helper.make_node("Gemm", ["hr", "w2", "b2"], ["logits"], name="dense2"),
        helper.make_node("ArgMax", ["logits"], ["predicted"], axis=1, keepdims=0, name="argmax"),
    ]
    graph = helper.make_graph(
        nodes,
        "digits",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 64])],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10]),
            helper.make_tensor_value_info("predicted", TensorProto.INT64, ["N"]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--root", default=Path(__file__).resolve().parent.parent, type=Path)
    root = ap.parse_args().root
    digits = load_digits()
    x = digits.data.astype(np.float32)
    y = digits.target.astype(np.int64)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(y))
    test = np.zeros(len(y), bool)
    test[order[: len(y) // 4]] = True
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=600, random_state=0)
    clf.fit(x[~test] / 16.0, y[~test])
    (root / "models").mkdir(exist_ok=True)
    onnx.save(digits_model(clf), root / "models" / "digits.onnx")

    data = root / "data" / "digits"
    shutil.rmtree(data, ignore_errors=True)
    pixels = pa.array(list(digits.data.astype(np.uint8)), pa.list_(pa.uint8()))
    table = pa.table({"id": np.arange(len(y), dtype=np.int64), "label": y, "pixels": pixels})
    for split, mask in (("train", ~test), ("test", test)):
        part = table.filter(pa.array(mask))
        half = part.num_rows // 2
        for i, piece in enumerate((part.slice(0, half), part.slice(half))):
            out = data / f"split={split}" / f"part-{i}.parquet"
            out.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(piece, out, row_group_size=200)
    print(f"wrote {root / 'models' / 'digits.onnx'} and {len(y)} rows under {data}")
    print(f"held-out accuracy of the MLP: {clf.score(x[test] / 16.0, y[test]):.3f}")


if __name__ == "__main__":
    main()
