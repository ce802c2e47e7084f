"""From a validated spec to everything the actors need, checked before any work starts.

Every mismatch between the spec, the model's signature and the input's schema is found
here, from metadata alone, and reported with the key, column and what was expected.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from batch_infer.backends.base import BackendOptions
from batch_infer.backends.tensorrt_build import plan_recipe
from batch_infer.data.decode import DecodedInput, plan_hook, plan_image, plan_text, read_labels
from batch_infer.data.postprocess import Builtin, Hook
from batch_infer.data.reading import Dataset, open_dataset
from batch_infer.data.tensors import InputBinding, check_binding
from batch_infer.errors import InputError, OutputError, SpecError, UserError
from batch_infer.location import is_uri, open_location
from batch_infer.model import ModelSignature, TensorInfo, read_signature
from batch_infer.spec import ImageInput, JobSpec, Postprocess, TextInput

if TYPE_CHECKING:
    from batch_infer.optimize.cache import Artifact


@dataclass(frozen=True)
class JobPlan:
    """What every inference actor is given once, at start."""

    spec: JobSpec
    dataset: Dataset
    signature: ModelSignature
    bindings: tuple[InputBinding, ...]
    outputs: tuple[tuple[TensorInfo, str], ...]  # model output -> output column
    keep_schema: pa.Schema
    backend: BackendOptions
    # Inputs decoded, tokenized or made by the preprocess hook (data/decode/).
    decoded: tuple[DecodedInput, ...] = ()
    postprocess: Builtin | Hook | None = None
    # model.optimize: the optimized model (its key and report); `signature` is its own.
    optimized: Artifact | None = None

    @property
    def columns(self) -> list[str]:
        """Input columns to read: model inputs first, then the kept ones; every column
        when a preprocess hook makes inputs (it is given the shard's columns)."""
        if any(not d.columns for d in self.decoded):
            return list(self.dataset.schema.names)
        cols = [c for b in self.bindings for c in b.columns]
        cols += [c for d in self.decoded for c in d.columns] + list(self.keep_schema.names)
        return list(dict.fromkeys(cols))

    def check_file(self, path: str, schema: pa.Schema) -> None:
        """An input file must fit as the first one did (`build_plan` checked that one): a
        later file with a float where the model takes integers, or without a column, would
        be truncated or fail shards mid-run. Its kept columns must cast to the first file's
        types: the output's parts share one schema. Partition columns come from the path."""
        for f in self.dataset.partition_schema:
            if f.name not in schema.names:
                schema = schema.append(f)
        where = f"input file {path}"
        for b in self.bindings:
            check_binding(b, schema, where)
        for name in (c for d in self.decoded for c in d.columns):
            if name not in schema.names:
                raise InputError(f"{where}: column {name!r} (for the model's inputs) is missing")
        for f in self.keep_schema:
            if f.name not in schema.names:
                raise InputError(f"{where}: column {f.name!r} (output.keep_columns) is missing")
            if not _castable(schema.field(f.name).type, f.type):
                raise InputError(
                    f"{where}: column {f.name!r} (output.keep_columns) is "
                    f"{schema.field(f.name).type} here and {f.type} in the input's first file; "
                    "the output's files must share one schema: cast it in one of them"
                )

    @property
    def text_columns(self) -> set[str]:
        cols = {c for b in self.bindings for c in b.columns}
        return cols | {c for d in self.decoded for c in d.columns}

    def config(self) -> dict:
        """What the outputs depend on: a rerun into the same output must match it."""
        return (
            {
                "model_sha256": self.signature.sha256,
                "inputs": {b.tensor.name: list(b.columns) for b in self.bindings},
                "outputs": {t.name: col for t, col in self.outputs},
                "keep_columns": list(self.keep_schema.names),
                "input_format": self.dataset.format,
                "shard_rows": self.spec.shard_rows,
            }
            | self._decode_config()
            | ({"optimize": self.optimized.record} if self.optimized else {})
        )

    def _decode_config(self) -> dict:
        """Decoders and postprocessing, only when the spec has them (older outputs match)."""
        out: dict = {}
        if self.decoded:
            out["decoded_inputs"] = {d.tensor.name: d.source.config() for d in self.decoded}
        if self.postprocess is not None:
            out["postprocess"] = self.postprocess.config()
        return out


def _castable(src: pa.DataType, dst: pa.DataType) -> bool:
    """Whether a kept column of a later file can take the first file's type: the same type
    (dictionary-encoded or not), text to text, or numbers to numbers (the actors' cast is a
    safe one: a value that does not fit fails its shard)."""
    if pa.types.is_dictionary(src):
        src = src.value_type
    kinds = (
        (pa.types.is_string, pa.types.is_large_string),
        (pa.types.is_integer, pa.types.is_floating),
    )
    return src.equals(dst) or any(
        any(k(src) for k in kind) and any(k(dst) for k in kind) for kind in kinds
    )


def _bindings(spec: JobSpec, signature: ModelSignature, dataset: Dataset) -> list[InputBinding]:
    names = [t.name for t in signature.inputs]
    for name in spec.model.inputs:
        if name not in names:
            raise SpecError(
                f"model.inputs: {name!r} is not an input of {signature.path}; "
                f"its inputs are: {', '.join(names)}"
            )
    missing = [n for n in names if n not in spec.model.inputs]
    if missing and spec.model.preprocess is None:
        raise SpecError(f"model.inputs: model input {missing[0]!r} is not mapped to a column")
    bindings = []
    for tensor in signature.inputs:
        cols = spec.model.inputs.get(tensor.name)
        if not isinstance(cols, str | list):
            continue  # decoded, tokenized or from the hook: see _decoded
        stacked = isinstance(cols, list)
        binding = InputBinding(tensor, tuple(cols) if stacked else (cols,), stacked)
        where = f"model.inputs.{tensor.name}"
        check_binding(binding, dataset.schema, where, text=dataset.format == "csv")
        bindings.append(binding)
    batches = {t.fixed_batch for t in signature.inputs}
    if len(batches) > 1:
        raise SpecError(
            f"{signature.path}: inputs disagree on the batch size: {sorted(map(str, batches))}"
        )
    return bindings


def _decoded(spec: JobSpec, signature: ModelSignature, dataset: Dataset) -> list[DecodedInput]:
    """The inputs decoded from images, tokenized from text, or left to the preprocess hook."""
    out, from_hook = [], []
    for tensor in signature.inputs:
        form = spec.model.inputs.get(tensor.name)
        where = f"model.inputs.{tensor.name}"
        if isinstance(form, ImageInput):
            out.append(plan_image(tensor, form, dataset.schema, where))
        elif isinstance(form, TextInput):
            out.append(plan_text(tensor, form, dataset.schema, where))
        elif form is None:
            from_hook.append(tensor)
    if spec.model.preprocess is not None:
        if not from_hook:
            raise SpecError(
                "model.preprocess: every model input is mapped in model.inputs, so the hook "
                "would feed none; leave out the inputs it makes"
            )
        out += plan_hook(spec.model.preprocess, from_hook)
    return out


def _postprocess(spec: JobSpec, signature: ModelSignature) -> Builtin | Hook | None:
    """The postprocess hook (it must import) or the built-in's output, checked: [N, classes]
    scores, labels as many as classes, top_k no more than classes."""
    post = spec.model.postprocess
    if post is None:
        return None
    if isinstance(post, str):
        from batch_infer.data.decode.hooks import load_hook

        load_hook(post, "model.postprocess")
        return Hook(post)
    assert isinstance(post, Postprocess)
    names = [t.name for t in signature.outputs]
    name = post.output
    if name is None:
        if len(names) > 1:
            raise SpecError(
                f"model.postprocess.output: {signature.path} has outputs {', '.join(names)}; "
                "name the one holding class scores"
            )
        name = names[0]
    if name not in names:
        raise SpecError(
            f"model.postprocess.output: {name!r} is not an output of {signature.path}; "
            f"its outputs are: {', '.join(names)}"
        )
    tensor = next(t for t in signature.outputs if t.name == name)
    classes = tensor.item_shape[-1] if tensor.item_shape else 1
    if len([d for d in tensor.item_shape if d != 1]) > 1 or tensor.dtype.kind != "f":
        raise SpecError(
            f"model.postprocess: output {name!r} is {tensor.dtype} {list(tensor.shape)}; "
            "label and score need float class scores [N, classes]"
        )
    labels = None
    if post.labels is not None:
        labels = read_labels(post.labels)
        if classes > 0 and len(labels) != classes:
            raise SpecError(
                f"model.postprocess.labels: {post.labels} has {len(labels)} labels; output "
                f"{name!r} has {classes} classes"
            )
    if classes > 0 and post.top_k > classes:
        raise SpecError(
            f"model.postprocess.top_k: {post.top_k}, but {name!r} has {classes} classes"
        )
    return Builtin(name, post.softmax, post.top_k, labels)


def _outputs(spec: JobSpec, signature: ModelSignature) -> list[tuple[TensorInfo, str]]:
    by_name = {t.name: t for t in signature.outputs}
    post = spec.model.postprocess
    if isinstance(post, str) or (post is not None and not post.keep_outputs):
        return []  # the postprocess makes the columns
    mapping = spec.model.outputs or {t.name: t.name for t in signature.outputs}
    for name in mapping:
        if name not in by_name:
            raise SpecError(
                f"model.outputs: {name!r} is not an output of {signature.path}; "
                f"its outputs are: {', '.join(by_name)}"
            )
    return [(by_name[name], col) for name, col in mapping.items()]


def backend_options(spec: JobSpec, signature: ModelSignature) -> BackendOptions:
    """The backend's options, checked now: a TensorRT profile or precision the model cannot
    take is a spec error before Ray starts. With `backend: auto`, a model TensorRT cannot
    be planned for is noted, and the actors skip TensorRT for the reason given."""
    engine, problem = None, None
    if spec.backend in ("auto", "tensorrt", "tensorrt-rtx"):
        trt = spec.tensorrt
        try:
            engine = plan_recipe(
                spec.backend,
                signature.inputs,
                batch_size=spec.batch_size,
                slots=spec.slots,
                precision=trt.precision,
                profile=trt.profile,
                compute_capability=trt.compute_capability,
                cache_dir=trt.cache_dir,
            )
        except UserError as exc:
            if spec.backend != "auto":
                raise
            problem = str(exc)
    return BackendOptions(spec.backend, spec.batch_size, spec.slots, engine, problem)


def _check_paths(spec: JobSpec, dataset: Dataset) -> None:
    """Output and input must not hold each other, however the paths are spelled (symbolic
    links resolved): a run would read its own predictions, or --overwrite delete its input."""
    out = open_location(spec.output.path, "output.path", OutputError)
    inp = dataset.location
    if inp.contains(out):
        raise SpecError(f"output.path: {out.root} is inside the input directory {inp.root}")
    if out.contains(inp):
        raise SpecError(
            f"input.path: {inp.root} is inside the output directory {out.root}; "
            "--overwrite would delete it"
        )


def build_plan(spec: JobSpec) -> JobPlan:
    """Check the spec against the model and the input; raise a UserError on any mismatch."""
    if not is_uri(spec.model.onnx) and not os.path.exists(spec.model.onnx):
        raise SpecError(f"model.onnx: {spec.model.onnx}: no such file")
    signature = read_signature(spec.model.onnx)
    options = backend_options(spec, signature)
    dataset = open_dataset(spec.input.path, spec.input.format)
    bindings = _bindings(spec, signature, dataset)
    decoded = _decoded(spec, signature, dataset)
    post = _postprocess(spec, signature)
    outputs = _outputs(spec, signature)
    for col in spec.output.keep_columns:
        if col not in dataset.schema.names:
            raise SpecError(
                f"output.keep_columns: column {col!r} is not in the input; "
                f"columns are: {', '.join(dataset.schema.names)}"
            )
    out_cols = [col for _, col in outputs]
    out_cols += list(post.columns) if isinstance(post, Builtin) else []
    clash = set(out_cols) & set(spec.output.keep_columns)
    if clash or len(set(out_cols)) != len(out_cols):
        name = sorted(clash)[0] if clash else out_cols[0]
        if isinstance(post, Builtin) and name in post.columns:
            raise SpecError(
                f"output: column {name!r} would be written twice (model.postprocess writes "
                f"{', '.join(post.columns)}); leave it out of output.keep_columns"
            )
        raise SpecError(
            f"output: column {name!r} would be written twice; rename it in model.outputs"
        )
    _check_paths(spec, dataset)
    keep_schema = pa.schema([dataset.schema.field(c) for c in spec.output.keep_columns])
    plan = JobPlan(
        spec,
        dataset,
        signature,
        tuple(bindings),
        tuple(outputs),
        keep_schema,
        options,
        decoded=tuple(decoded),
        postprocess=post,
    )
    if spec.model.optimize is None:
        return plan
    from batch_infer.optimize.optimizer import optimize_plan  # ONNX Runtime's tools: only now

    return optimize_plan(plan)
