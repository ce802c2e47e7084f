"""Regenerate the image and text examples' shipped files (jobs/images.yaml, jobs/text.yaml).

Everything is made here, offline, and is small:
  data/scenes/       32 JPEG photos of four kinds of scene, one of them truncated on purpose,
                     and index.csv naming each file (relative to it) with its true label;
  models/scenes.onnx a tiny CNN over uint8 NHWC pixels (normalization in the graph; its last
                     layer trained with scikit-learn on 400 more generated photos);
  data/reviews/      a Parquet of 48 sentences on four topics, one of them null;
  models/reviews.*   a WordLevel tokenizer trained on the sentences with `tokenizers`, and a
                     bag-of-words classifier (embedding, masked mean, trained with scikit-learn);
  models/*.labels.txt  one label per line, for the built-in postprocess.

Needs scikit-learn, Pillow and tokenizers: pip install -e ".[examples]". The generators
(`photo`, `jpeg`, `train_tokenizer`, ...) are also used by the tests and the benchmarks.
"""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SCENES = ("sunset", "forest", "ocean", "snow")
PALETTES = {
    "sunset": [(250, 120, 40), (200, 60, 80), (120, 40, 110), (255, 190, 90)],
    "forest": [(40, 110, 40), (90, 140, 50), (70, 60, 30), (20, 70, 30)],
    "ocean": [(20, 80, 160), (40, 140, 190), (10, 40, 90), (90, 180, 200)],
    "snow": [(235, 240, 245), (200, 210, 220), (250, 250, 250), (170, 180, 195)],
}
TOPICS = {
    "sports": ["team", "goal", "match", "coach", "season", "players", "scored", "league"],
    "weather": ["rain", "storm", "sunny", "wind", "forecast", "snow", "cloudy", "degrees"],
    "food": ["recipe", "bread", "cheese", "soup", "dinner", "spicy", "baked", "sauce"],
    "tech": ["software", "laptop", "chip", "update", "battery", "network", "app", "cloud"],
}
FILLER = ["the", "a", "today", "was", "very", "and", "this", "we", "really", "new", "it", "of"]
IMAGE_SIZE = 64


def photo(rng: np.random.Generator, width: int, height: int, palette=None) -> np.ndarray:
    """A photo-like [height, width, 3] uint8 picture: smooth gradients, round shapes and
    grain, so JPEG compresses it as it does real photos (about 50 KB at 500x375, q90)."""
    palette = palette or [tuple(rng.integers(0, 256, 3)) for _ in range(4)]
    colors = np.asarray(palette, np.float32)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    a, b = colors[rng.integers(len(colors), size=2)]
    t = np.clip(rng.uniform(0.3, 1) * y + rng.uniform(-0.3, 0.3) * x, 0, 1)
    img = a * (1 - t) + b * t + 12 * np.sin(x * rng.uniform(6, 40) + y * rng.uniform(2, 9))
    yy, xx = np.ogrid[:height, :width]
    for _ in range(rng.integers(3, 7)):
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.08, 0.3) * min(width, height)
        img[(xx - cx) ** 2 + (yy - cy) ** 2 < r * r] = colors[rng.integers(len(colors))]
    img += rng.integers(-10, 11, img.shape, dtype=np.int8)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def scene_photo(rng: np.random.Generator, label: str, width: int, height: int) -> np.ndarray:
    return photo(rng, width, height, PALETTES[label])


def _save(model: onnx.ModelProto, path: Path) -> str:
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return str(path)


def cnn_features(size: int = IMAGE_SIZE, seed: int = 0) -> tuple[list, list]:
    """(nodes, initializers): uint8 NHWC pixels -> 11 features: each channel's mean and
    the mean of 8 fixed 3x3 filters' ReLU (the CNN's body; only its head is trained)."""
    rng = np.random.default_rng(seed)
    conv = rng.standard_normal((8, 3, 3, 3)).astype(np.float32) / 3
    inits = [
        numpy_helper.from_array(np.array(255.0, np.float32), "scale"),
        numpy_helper.from_array(conv, "conv_w"),
        numpy_helper.from_array(np.zeros(8, np.float32), "conv_b"),
    ]
    nodes = [
        helper.make_node("Cast", ["pixels"], ["pf"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["pf", "scale"], ["px"]),
        helper.make_node("Transpose", ["px"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["gr"]),
        helper.make_node("GlobalAveragePool", ["nchw"], ["gm"]),
        helper.make_node("Concat", ["gm", "gr"], ["g"], axis=1),
        helper.make_node("Flatten", ["g"], ["features"], axis=1),
    ]
    return nodes, inits


def image_model(path: Path, weights: np.ndarray, bias: np.ndarray, size: int = IMAGE_SIZE) -> str:
    """The CNN: pixels uint8 [N, size, size, 3] -> logits float [N, classes]."""
    nodes, inits = cnn_features(size)
    inits += [numpy_helper.from_array(weights, "head_w"), numpy_helper.from_array(bias, "head_b")]
    nodes.append(helper.make_node("Gemm", ["features", "head_w", "head_b"], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "scenes",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", weights.shape[1]])],
        inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def features_of(pixels: np.ndarray) -> np.ndarray:
    """Run the CNN's body alone (onnxruntime) on [N, size, size, 3] pixels."""
    import onnxruntime as ort

    nodes, inits = cnn_features(pixels.shape[1])
    size = pixels.shape[1]
    graph = helper.make_graph(
        nodes,
        "body",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 11])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"pixels": pixels})[0]


def train_image_model(path: Path, samples: int = 400, size: int = IMAGE_SIZE) -> str:
    """Fit the head on generated photos (decoded as the job decodes them) and save."""
    from sklearn.linear_model import LogisticRegression

    from batch_infer.data.decode.images import ImageDecode, decode_pillow

    d = ImageDecode("image", size, size, "shorter_side_crop", "NHWC", "RGB", "cpu", False)
    rng = np.random.default_rng(123)
    labels = rng.integers(len(SCENES), size=samples)
    pixels = np.stack(
        [decode_pillow(jpeg(scene_photo(rng, SCENES[k], 120, 90)), d) for k in labels]
    )
    clf = LogisticRegression(max_iter=2000, C=10.0).fit(features_of(pixels), labels)
    return image_model(
        path, clf.coef_.T.astype(np.float32), clf.intercept_.astype(np.float32), size
    )


def sentence(rng: np.random.Generator, topic: str) -> str:
    words = list(rng.choice(TOPICS[topic], 3)) + list(rng.choice(FILLER, 4))
    rng.shuffle(words)
    return " ".join(words).capitalize() + "."


def train_tokenizer(sentences: list[str], path: Path | None = None) -> str:
    """A WordLevel tokenizer (lowercase, split on whitespace and punctuation) trained on
    `sentences` with `tokenizers`: its JSON, also written to `path`."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"])
    tok.train_from_iterator(sentences, trainer)
    text = tok.to_str()
    if path is not None:
        path.write_text(text)
    return text


def text_model(path: Path, table: np.ndarray, bias: np.ndarray, length: int) -> str:
    """input_ids, attention_mask int64 [N, length] -> logits [N, classes]: the masked mean of
    each token's row of `table` (a bag of words' linear classifier) plus `bias`."""
    inits = [
        numpy_helper.from_array(table, "table"),
        numpy_helper.from_array(bias, "bias"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    nodes = [
        helper.make_node("Gather", ["table", "input_ids"], ["emb"]),  # [N, L, C]
        helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["m", "axis2"], ["m3"]),
        helper.make_node("Mul", ["emb", "m3"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis1"], ["total"], keepdims=0),
        helper.make_node("ReduceSum", ["m", "axis1"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "one"], ["safe"]),
        helper.make_node("Div", ["total", "safe"], ["mean"]),
        helper.make_node("Add", ["mean", "bias"], ["logits"]),
    ]
    inits += [
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], np.int64), "axis2"),
    ]
    graph = helper.make_graph(
        nodes,
        "reviews",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["N", length]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["N", length]),
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", table.shape[1]])],
        inits,
    )
    return _save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)


def train_text_model(path: Path, tokenizer_json: str, length: int = 16) -> str:
    """Fit a bag-of-words logistic regression on generated sentences; its weights become
    the model's token table, so the model's mean over tokens is the classifier."""
    from sklearn.linear_model import LogisticRegression
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    rng = np.random.default_rng(321)
    topics = list(TOPICS)
    labels = rng.integers(len(topics), size=600)
    vocab = tok.get_vocab_size()
    bags = np.zeros((len(labels), vocab), np.float32)
    for i, k in enumerate(labels):
        ids = tok.encode(sentence(rng, topics[k])).ids[:length]
        np.add.at(bags[i], ids, 1.0 / len(ids))
    clf = LogisticRegression(max_iter=2000, C=20.0).fit(bags, labels)
    table = clf.coef_.T.astype(np.float32)
    return text_model(path, table, clf.intercept_.astype(np.float32), length)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=ROOT)
    args = ap.parse_args()
    data, models = args.root / "data", args.root / "models"
    models.mkdir(parents=True, exist_ok=True)

    scenes = data / "scenes"
    shutil.rmtree(scenes, ignore_errors=True)
    (scenes / "images").mkdir(parents=True)
    rng = np.random.default_rng(2026)
    rows = []
    for i in range(32):
        label = SCENES[i % len(SCENES)]
        blob = jpeg(scene_photo(rng, label, 120, 90) if i % 3 else scene_photo(rng, label, 90, 120))
        if i == 7:
            blob = blob[: len(blob) // 2]  # a truncated download: a bad row in _errors/
        name = f"images/{i:03d}-{label}.jpg"
        (scenes / name).write_bytes(blob)
        rows.append((i, name, label))
    index = pa.table({k: [r[j] for r in rows] for j, k in enumerate(("id", "path", "truth"))})
    import pyarrow.csv as pacsv

    pacsv.write_csv(index, scenes / "index.csv")
    (models / "scenes.labels.txt").write_text("\n".join(SCENES) + "\n")
    train_image_model(models / "scenes.onnx")

    reviews = data / "reviews"
    shutil.rmtree(reviews, ignore_errors=True)
    reviews.mkdir(parents=True)
    topics = list(TOPICS)
    texts, labels = [], []
    for i in range(48):
        topic = topics[i % len(topics)]
        texts.append(None if i == 5 else sentence(rng, topic))  # a null text: a bad row
        labels.append(topic)
    pq.write_table(
        pa.table({"id": np.arange(48), "text": texts, "truth": labels}), reviews / "part-0.parquet"
    )
    corpus = [sentence(np.random.default_rng(s), t) for s in range(200) for t in topics]
    tokenizer = train_tokenizer(corpus, models / "reviews.tokenizer.json")
    (models / "reviews.labels.txt").write_text("\n".join(topics) + "\n")
    train_text_model(models / "reviews.onnx", tokenizer)
    print(f"wrote {scenes}, {reviews} and models/scenes.*, models/reviews.*")


if __name__ == "__main__":
    main()
