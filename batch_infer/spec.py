"""The job spec: a YAML file validated as a whole before any work starts.

Relative paths are resolved against the directory the command runs from and stored absolute,
so actors on other processes or nodes see the same files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from batch_infer.errors import SpecError

Backend = Literal["auto", "onnxruntime", "tensorrt", "tensorrt-rtx"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    path: str = Field(description="A file, a directory (hive partitions become columns) or a glob.")
    format: Literal["parquet", "csv", "ipc"] = "parquet"


class ModelSpec(_Strict):
    onnx: str
    inputs: dict[str, str | list[str]] = Field(
        description="ONNX input name -> one column, or a list of numeric columns to stack."
    )
    outputs: dict[str, str] | None = Field(
        default=None, description="ONNX output name -> output column; default: all, same names."
    )

    @field_validator("inputs")
    @classmethod
    def _inputs_not_empty(cls, v: dict[str, str | list[str]]) -> dict[str, str | list[str]]:
        if not v:
            raise ValueError("map at least one ONNX input to a column")
        for name, cols in v.items():
            if isinstance(cols, list) and not cols:
                raise ValueError(f"input {name!r}: the list of columns to stack is empty")
        return v


class OutputSpec(_Strict):
    path: str
    keep_columns: list[str] = Field(default_factory=list)
    row_group_rows: int = Field(default=65536, ge=1)


class TensorRTSpec(_Strict):
    """Engine build options for the tensorrt and tensorrt-rtx backends."""

    precision: Literal["fp32", "fp16", "int8"] | None = Field(
        default=None, description="Builder flag (TensorRT); TensorRT-RTX takes it from the ONNX."
    )
    profile: dict[str, dict[str, list[int]]] = Field(
        default_factory=dict, description="input -> {min, opt, max} shapes (batch first)."
    )
    cache_dir: str | None = None
    compute_capability: str | None = Field(
        default=None, description="Build for this GPU, e.g. '8.9' (TensorRT-RTX, ahead of time)."
    )


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    input: InputSpec
    model: ModelSpec
    output: OutputSpec
    backend: Backend = "auto"
    device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description="auto: one actor per GPU when the cluster has GPUs."
    )
    slots: int = Field(default=2, ge=1, le=8, description="Batches in flight per GPU actor.")
    tensorrt: TensorRTSpec = Field(default_factory=TensorRTSpec)
    batch_size: int = Field(default=512, ge=1)
    max_bad_rows: int = Field(default=0, ge=0)
    max_retries: int = Field(default=3, ge=0, description="Extra attempts per shard.")
    num_actors: int | None = Field(
        default=None, ge=1, description="CPU-only clusters: inference actors (default: CPUs)."
    )
    num_writers: int | None = Field(default=None, ge=1)
    shard_rows: int | None = Field(
        default=None, ge=1, description="Target rows per shard (default: planned from the data)."
    )


def _resolve(path: str) -> str:
    if "://" in path:
        return path
    return str(Path(os.path.expanduser(path)).absolute())


def _set_dotted(doc: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = doc
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {key}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """`key.sub=value` strings -> {key.sub: value}, values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SpecError(f"--set {pair!r}: expected key.sub=value")
        try:
            out[key] = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError as exc:
            raise SpecError(f"--set {pair!r}: the value is not valid YAML ({exc})") from None
    return out


def _format_validation(where: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{where}: key '{key}': {msg}")
    return "\n".join(lines)


def spec_from_dict(
    doc: Any, where: str = "spec", overrides: dict[str, Any] | None = None
) -> JobSpec:
    """Validate a spec mapping (after applying `--set` overrides) and resolve its paths."""
    if not isinstance(doc, dict):
        raise SpecError(
            f"{where}: expected a YAML mapping at the top level, got {type(doc).__name__}"
        )
    for key, value in (overrides or {}).items():
        _set_dotted(doc, key, value)
    try:
        spec = JobSpec.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(_format_validation(where, exc)) from None
    return spec.model_copy(
        update={
            "input": spec.input.model_copy(update={"path": _resolve(spec.input.path)}),
            "model": spec.model.model_copy(update={"onnx": _resolve(spec.model.onnx)}),
            "output": spec.output.model_copy(update={"path": _resolve(spec.output.path)}),
        }
    )


def load_spec(path: str | os.PathLike[str], overrides: dict[str, Any] | None = None) -> JobSpec:
    """Read and validate a YAML job spec."""
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise SpecError(f"{p}: no such job spec file") from None
    except OSError as exc:
        raise SpecError(f"{p}: cannot read the job spec ({exc.strerror})") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{p}: malformed YAML{at}: {problem}") from None
    return spec_from_dict(doc, where=str(p), overrides=overrides)
