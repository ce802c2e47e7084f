"""Models and inputs for the optimization tests and the CPU benchmark.

`models/patterns_cnn.onnx` (a small CNN trained on `pattern_images`) and
`models/tiny_bert.onnx` (a 2-layer BERT with random weights, exported with eager attention)
are committed; `python tests/optimize_models.py` makes them again (needs torch and
transformers: pip install torch==2.13.0 transformers). Everything else here needs numpy only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
CNN = ROOT / "models" / "patterns_cnn.onnx"
TINY_BERT = ROOT / "models" / "tiny_bert.onnx"
SIDE = 32  # patterns are SIDE x SIDE RGB
SEQ, VOCAB, HEADS, HIDDEN = 32, 1000, 4, 64  # the tiny BERT


def pattern_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 NHWC images, labels): oriented gratings, the class is the orientation (10
    over 180 degrees); frequency, phase, colours and noise vary at random."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    theta = labels * np.pi / 10 + rng.uniform(-0.05, 0.05, n)
    freq = rng.uniform(0.25, 0.6, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE].astype(np.float32)
    proj = np.cos(theta)[:, None, None] * xx + np.sin(theta)[:, None, None] * yy
    wave = np.sin(freq[:, None, None] * proj + phase[:, None, None])
    fg = rng.uniform(0.5, 1, (n, 1, 1, 3))
    bg = fg - rng.uniform(0.4, 0.5, (n, 1, 1, 3))
    t = (wave[..., None] + 1) / 2
    img = t * fg + (1 - t) * bg + rng.normal(0, 0.05, (n, SIDE, SIDE, 3))
    return (np.clip(img, 0, 1) * 255).astype(np.uint8), labels


def write_images(root: Path, rows: int, files: int = 2, seed: int = 0, group: int = 256) -> Path:
    """Pattern images as Parquet: id, label and raw pixels (fixed_size_binary)."""
    root.mkdir(parents=True, exist_ok=True)
    per = -(-rows // files)
    for i in range(files):
        n = min(per, rows - i * per)
        pixels, labels = pattern_images(n, seed * 1000 + i)
        col = pa.FixedSizeBinaryArray.from_buffers(
            pa.binary(SIDE * SIDE * 3), n, [None, pa.py_buffer(pixels.tobytes())]
        )
        ids = np.arange(i * per, i * per + n)
        table = pa.table({"id": ids, "label": labels, "pixels": col})
        pq.write_table(table, root / f"part-{i}.parquet", row_group_size=group)
    return root


def write_tokens(root: Path, rows: int, seed: int = 0) -> Path:
    """Token ids and attention masks for the tiny BERT (fixed-size lists of SEQ)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, (rows, SEQ))
    lengths = rng.integers(4, SEQ, rows)
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int64)
    table = pa.table(
        {
            "id": np.arange(rows),
            "ids": pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), SEQ),
            "mask": pa.FixedSizeListArray.from_arrays(pa.array(mask.reshape(-1)), SEQ),
        }
    )
    pq.write_table(table, root / "part-0.parquet", row_group_size=500)
    return root


def make_outlier_model(path: Path) -> str:
    """x float[N,16] -> logits float[N,4], a 2-layer MLP with one outlier weight (40, where
    the others are about 0.3) in a hidden unit nothing reads, on an input that is always 0.
    Per-channel int8 keeps every other unit exact enough; per-tensor int8 rounds all of the
    other weights to -0.3, 0 or 0.3: a deliberately bad recipe."""
    rng = np.random.default_rng(3)
    w1 = rng.normal(0, 0.3, (16, 32)).astype(np.float32)
    w1[3, 5] = 40.0
    b1 = rng.normal(0, 0.1, 32).astype(np.float32)
    w2 = rng.normal(0, 0.3, (32, 4)).astype(np.float32)
    w2[5] = 0.0
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h0"], name="dense1"),
            helper.make_node("Add", ["h0", "b1"], ["h1"], name="bias1"),
            helper.make_node("Relu", ["h1"], ["h"], name="relu1"),
            helper.make_node("MatMul", ["h", "w2"], ["logits"], name="dense2"),
        ],
        "outlier",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"))],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


def write_features(root: Path, rows: int, seed: int = 0) -> Path:
    """Inputs for the outlier model: 16 normal features, feature 3 always 0."""
    root.mkdir(parents=True, exist_ok=True)
    x = np.random.default_rng(seed).normal(0, 1, (rows, 16)).astype(np.float32)
    x[:, 3] = 0.0
    table = pa.table(
        {"id": np.arange(rows), "x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 16)}
    )
    pq.write_table(table, root / "part-0.parquet", row_group_size=500)
    return root


def make_sparse_model(path: Path) -> str:
    """pixels float[N,8,6,6] -> y float[N,4]: a Conv whose weights follow 2:4 sparsity along
    the input channels (2 of every 4 are zero), then a dense MatMul that does not."""
    rng = np.random.default_rng(5)
    conv = rng.normal(0, 0.3, (16, 8, 3, 3)).astype(np.float32)
    conv[:, 1::4] = 0.0
    conv[:, 2::4] = 0.0
    dense = rng.normal(0, 0.3, (16, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["pixels", "conv_w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["r"], name="relu"),
            helper.make_node("GlobalAveragePool", ["r"], ["g"], name="pool"),
            helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
            helper.make_node("MatMul", ["f", "dense_w"], ["y"], name="dense"),
        ],
        "sparse",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["N", 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(conv, "conv_w"), numpy_helper.from_array(dense, "dense_w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


def train_patterns_cnn(path: Path = CNN, rows: int = 20000, epochs: int = 6) -> None:
    """Train the small CNN on pattern images (torch, CPU, minutes) and export it:
    uint8 pixels [N,32,32,3] -> logits [N,10]; normalization inside the graph."""
    import torch

    torch.manual_seed(0)
    x, y = pattern_images(rows, seed=1)
    conv = torch.nn.Conv2d
    relu = torch.nn.ReLU

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = torch.nn.Sequential(
                conv(3, 32, 3, padding=1), relu(), conv(32, 32, 3, padding=1), relu(),
                torch.nn.MaxPool2d(2),
                conv(32, 64, 3, padding=1), relu(), conv(64, 64, 3, padding=1), relu(),
                torch.nn.MaxPool2d(2),
                conv(64, 128, 3, padding=1), relu(), torch.nn.AdaptiveAvgPool2d(1),
                torch.nn.Flatten(), torch.nn.Linear(128, 10),
            )  # fmt: skip

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            return self.f(pixels.float().permute(0, 3, 1, 2) / 255.0)

    net = Net()
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    images, labels = torch.from_numpy(x), torch.from_numpy(y)
    for epoch in range(epochs):
        if epoch == epochs - 2:
            for group in opt.param_groups:
                group["lr"] = 3e-4
        for i in torch.randperm(len(images)).split(128):
            loss = torch.nn.functional.cross_entropy(net(images[i]), labels[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    torch.onnx.export(
        net,
        (torch.zeros(2, SIDE, SIDE, 3, dtype=torch.uint8),),
        str(path),
        input_names=["pixels"],
        output_names=["logits"],
        dynamic_axes={"pixels": {0: "N"}, "logits": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )


def export_tiny_bert(path: Path = TINY_BERT) -> None:
    """A 2-layer BERT (hidden 64, 4 heads, seq 32) with random weights and eager attention
    (the form ONNX Runtime's Attention fusion matches): ids, mask int64 -> pooled [N,64]."""
    from tests.gpu_models import export_bert

    export_bert(
        path, SEQ, vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
        num_attention_heads=HEADS, intermediate_size=128, max_position_embeddings=64,
        attn_implementation="eager",
    )  # fmt: skip


if __name__ == "__main__":
    train_patterns_cnn()
    export_tiny_bert()
