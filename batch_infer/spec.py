"""The job spec: a YAML file validated as a whole before any work starts.

Relative paths are resolved against the directory the command runs from and stored absolute,
so actors on other processes or nodes see the same files.

A spec may carry a `schedule` (a cron expression and a time zone) and use `{date}` or
`{date:FORMAT}` (strftime) in `input.path`, `output.path` and `model.onnx`: they are filled
in with the run's logical date when the spec is loaded (`--date`, default: today in the
schedule's time zone, or in UTC without a schedule). `{{` and `}}` are literal braces.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import os
import re
import string
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from batch_infer.errors import SpecError
from batch_infer.location import absolute

Backend = Literal["auto", "onnxruntime", "tensorrt", "tensorrt-rtx"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    path: str = Field(description="A file, a directory (hive partitions become columns) or a glob.")
    format: Literal["parquet", "csv", "ipc"] = "parquet"


class ImageInput(_Strict):
    """An input decoded from encoded images: bytes (JPEG, PNG, WebP, ...) or file paths/URIs."""

    column: str
    decode: Literal["image"]
    size: tuple[int, int] = Field(description="[height, width] the model takes.")
    resize: Literal["shorter_side_crop", "stretch"] = Field(
        default="shorter_side_crop",
        description="shorter_side_crop: shorter side to size, then the centre; stretch: to size.",
    )
    layout: Literal["NHWC", "NCHW"] = "NHWC"
    dtype: Literal["uint8", "float32"] = Field(
        default="uint8", description="Pixel values 0-255 either way: normalize in the model."
    )
    channels: Literal["RGB", "BGR", "L"] = "RGB"
    device: Literal["auto", "cpu", "gpu"] = Field(
        default="auto", description="Where to decode: auto uses the GPU decoder when it can."
    )

    @field_validator("size")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 1:
            raise ValueError(f"{list(v)}: height and width must be positive")
        return v


class TextInput(_Strict):
    """An input tokenized from a text column with a Hugging Face `tokenizer.json`."""

    column: str
    tokenizer: str = Field(description="A tokenizer.json (path or URI).")
    max_length: int = Field(ge=1)
    field: Literal["input_ids", "attention_mask", "token_type_ids"] | None = Field(
        default=None, description="The encoding's field; default: the ONNX input's name."
    )
    padding: Literal["max_length", "longest"] = "max_length"
    truncation: bool = Field(
        default=True, description="Cut longer texts; false: a longer text is a bad row."
    )


class Postprocess(_Strict):
    """Built-in postprocessing of one model output (scores over classes): label and score."""

    output: str | None = Field(default=None, description="Model output; default: the only one.")
    softmax: bool = False
    top_k: int = Field(default=1, ge=1, description="1: argmax; more: lists of the top k too.")
    labels: str | None = Field(default=None, description="A text file, one label per line.")
    keep_outputs: bool = Field(default=False, description="Also write the raw model outputs.")


# The forms a key may take, told apart before validation so that an error speaks of the form
# given; pydantic puts the form's tag in an error's location right after the key
# (`model.inputs.<name>`, `model.postprocess`), and `_format_validation` takes it out there.
FORM_TAGS = (
    "one column",
    "column list",
    "image input",
    "text input",
    "hook function",
    "built-in steps",
)


def _input_form(v: Any) -> str | None:
    if isinstance(v, str):
        return "one column"
    if isinstance(v, list):
        return "column list"
    if isinstance(v, dict | ImageInput | TextInput):
        get = v.get if isinstance(v, dict) else lambda k: getattr(v, k, None)
        if get("decode") is not None:
            return "image input"
        return "text input" if get("tokenizer") else None
    return None


ModelInput = Annotated[
    Annotated[str, Tag("one column")]
    | Annotated[list[str], Tag("column list")]
    | Annotated[ImageInput, Tag("image input")]
    | Annotated[TextInput, Tag("text input")],
    Discriminator(
        _input_form,
        custom_error_type="input_form",
        custom_error_message="expected a column, a list of columns, {column, decode: image, "
        "size, ...} or {column, tokenizer, max_length, ...}",
    ),
]


def _postprocess_form(v: Any) -> str | None:
    if isinstance(v, str):
        return "hook function"
    return "built-in steps" if isinstance(v, dict | Postprocess) else None


PostprocessForm = Annotated[
    Annotated[str, Tag("hook function")] | Annotated[Postprocess, Tag("built-in steps")],
    Discriminator(
        _postprocess_form,
        custom_error_type="postprocess_form",
        custom_error_message="expected package.module:function or {softmax, top_k, labels, ...}",
    ),
]


class GateSpec(_Strict):
    """The accuracy gate an optimized model must pass against the original, on held-out rows."""

    rows: int = Field(default=256, ge=1, description="Held-out input rows (not calibration).")
    max_rel_l2: float = Field(default=0.05, gt=0, description="Per float output: relative L2.")
    min_top1_agreement: float = Field(
        default=0.99, ge=0, le=1, description="Classifier outputs (and integer outputs): agreement."
    )
    max_abs: float | None = Field(default=None, gt=0, description="Largest absolute difference.")
    min_cosine: float | None = Field(default=None, ge=-1, le=1)


class Int8Spec(_Strict):
    """Overrides of the target's int8 recipe (auto: the target's own, see docs/optimize.md)."""

    activations: Literal["auto", "uint8", "int8"] = "auto"
    per_channel: bool | None = None
    reduce_range: bool | None = None


class OptimizeSpec(_Strict):
    """Make the model faster for the job's backend before it runs (batch_infer/optimize/)."""

    precision: Literal["fp32", "fp16", "int8", "fp8"] = "fp32"
    fuse: bool = Field(default=True, description="ONNX Runtime's fusions (ONNX Runtime targets).")
    calibration_rows: int = Field(default=512, ge=1, description="Rows of the job's own input.")
    seed: int = Field(default=0, ge=0, description="Seeds the draw of calibration and gate rows.")
    gate: GateSpec = Field(default_factory=GateSpec)
    target: Literal["auto", "onnxruntime-cpu", "onnxruntime-cuda", "tensorrt", "tensorrt-rtx"] = (
        Field(default="auto", description="auto: the backend the job would use.")
    )
    sparsity: bool = Field(default=False, description="TensorRT's sparse-weights flag (2:4).")
    num_heads: int = Field(default=0, ge=0, description="Attention fusion; 0: detected.")
    hidden_size: int = Field(default=0, ge=0, description="Attention fusion; 0: detected.")
    int8: Int8Spec = Field(default_factory=Int8Spec)


class ModelSpec(_Strict):
    onnx: str
    inputs: dict[str, ModelInput] = Field(
        description="ONNX input name -> one column, a list of numeric columns to stack, an "
        "image column to decode or a text column to tokenize."
    )
    outputs: dict[str, str] | None = Field(
        default=None, description="ONNX output name -> output column; default: all, same names."
    )
    preprocess: str | None = Field(
        default=None,
        description="package.module:function: the shard's columns (an Arrow table) -> numpy "
        "arrays for the model inputs not in `inputs` (and optionally bad-row reasons).",
    )
    postprocess: PostprocessForm | None = Field(
        default=None,
        description="package.module:function (model outputs -> output columns), or built-in "
        "{softmax, top_k, labels, ...}.",
    )
    optimize: OptimizeSpec | None = Field(
        default=None, description="fp16/int8/fp8, fusion, an accuracy gate (docs/optimize.md)."
    )

    @field_validator("inputs")
    @classmethod
    def _inputs_not_empty(cls, v: dict[str, Any]) -> dict[str, Any]:
        for name, cols in v.items():
            if isinstance(cols, list) and not cols:
                raise ValueError(f"input {name!r}: the list of columns to stack is empty")
        return v

    @model_validator(mode="after")
    def _inputs_fed(self) -> ModelSpec:
        if not self.inputs and self.preprocess is None:
            raise ValueError("map at least one ONNX input to a column (or name a preprocess hook)")
        return self

    @field_validator("preprocess", "postprocess")
    @classmethod
    def _hook_name(cls, v: Any) -> Any:
        if isinstance(v, str) and not re.fullmatch(r"[\w.]+:[\w.]+", v):
            raise ValueError(f"{v!r}: expected package.module:function")
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


# Macros every target understands: cronie/Vixie cron, systemd (via croniter's expansion),
# Kubernetes CronJob and KubeRay's RayCronJob (robfig/cron's ParseStandard).
CRON_MACROS = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@hourly")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_CRON_FIELDS = ("minute", "hour", "day-of-month", "month", "day-of-week")


def _check_cron_field(index: int, text: str) -> None:
    names = _MONTHS if index == 3 else _WEEKDAYS if index == 4 else ()
    field = f"{_CRON_FIELDS[index]} field {text!r}"
    for atom in re.split(r"[,/-]", text):
        if not (atom == "*" or atom.isdigit() or atom.lower() in names):
            raise ValueError(
                f"{field}: {atom!r} is not portable to cron, systemd and Kubernetes (use "
                "numbers, *, ranges a-b, lists a,b and steps /n)"
            )
    for item in text.split(","):  # what croniter takes and Kubernetes (robfig/cron) refuses
        span = [a for a in item.split("/")[0].split("-") if a != "*"]
        values = [int(a) if a.isdigit() else names.index(a.lower()) + (index == 3) for a in span]
        if index == 4 and 7 in values:
            raise ValueError(
                f"{field}: 7 for Sunday is not portable (Kubernetes takes 0-6): write Sunday as 0"
            )
        if len(values) == 2 and values[0] > values[1]:
            raise ValueError(
                f"{field}: the range {item.split('/')[0]!r} runs backwards, which cron and "
                "Kubernetes refuse: write it as two ranges"
            )


class ScheduleSpec(_Strict):
    """When a job runs: a standard 5-field cron expression in an IANA time zone."""

    cron: str = Field(
        description="minute hour day-of-month month day-of-week, or @daily, @hourly, ..."
    )
    timezone: str = Field(default="UTC", description="IANA time zone, e.g. Europe/Berlin.")

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, v: str) -> str:
        expr = " ".join(v.split())
        if expr.startswith("@"):
            if expr.lower() not in CRON_MACROS:
                known = ", ".join(CRON_MACROS)
                raise ValueError(f"{expr!r}: unknown macro; expected one of {known}")
            return expr.lower()
        fields = expr.split(" ")
        if len(fields) != 5:
            raise ValueError(
                f"{expr!r}: expected 5 fields (minute hour day-of-month month day-of-week), "
                f"got {len(fields)}"
            )
        for i, text in enumerate(fields):
            _check_cron_field(i, text)
        dom, dow = fields[2], fields[4]
        if "*" not in (dom, dow) and (dom.startswith("*") or dow.startswith("*")):
            raise ValueError(
                f"{expr!r}: day-of-month {dom!r} with day-of-week {dow!r} is ambiguous (cron "
                "implementations disagree on */n here); list the days instead"
            )
        from croniter import CroniterBadDateError, croniter  # only specs with a schedule pay

        if not croniter.is_valid(expr):
            raise ValueError(f"{expr!r}: not a valid cron expression (a value is out of range?)")
        try:
            croniter(expr).get_next()
        except CroniterBadDateError:
            raise ValueError(f"{expr!r}: never matches a date (e.g. 30 February)") from None
        return expr

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, v: str) -> str:
        try:
            zoneinfo.ZoneInfo(v)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(
                f"unknown time zone {v!r}; expected an IANA name such as UTC or Europe/Berlin"
            ) from None
        return v

    @property
    def tz(self) -> zoneinfo.ZoneInfo:
        return zoneinfo.ZoneInfo(self.timezone)

    def today(self) -> dt.date:
        """The current date in the schedule's time zone: a run's default logical date."""
        return dt.datetime.now(self.tz).date()


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
    schedule: ScheduleSpec | None = Field(
        default=None, description="When the job runs (`batch-infer schedule` emits the timers)."
    )
    date: str | None = Field(
        default=None,
        description="The logical date (YYYY-MM-DD) the paths were filled in for; set when the "
        "spec is loaded (--date, or the schedule's today), never written in a spec.",
    )


def set_dotted(doc: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = doc
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise SpecError(f"--set {key}: {part!r} is not a mapping")
        node = child
    node[parts[-1]] = value


def add_spec_arguments(parser: argparse.ArgumentParser, *, run: bool = False) -> None:
    """The `--set` overrides every command that reads a spec takes (parsed by
    `parse_overrides`); with `run`, also the options of a run: `--overwrite` and `--date`."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY.SUB=VALUE",
        help="override a spec key, e.g. --set batch_size=256",
    )
    if run:
        parser.add_argument(
            "--overwrite", action="store_true", help="discard what the output holds and start over"
        )
        parser.add_argument(
            "--date",
            metavar="YYYY-MM-DD",
            help="the logical date filled into {date} in the spec's paths (default: today in "
            "the schedule's time zone, UTC without a schedule); rerunning a date resumes it",
        )


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


def _without_form_tag(loc: tuple[int | str, ...]) -> tuple[int | str, ...]:
    """An error's location without the form's tag pydantic puts after a key of several forms
    (only there: a model input may well be named like a tag)."""
    at = 3 if loc[:2] == ("model", "inputs") else 2 if loc[:2] == ("model", "postprocess") else 0
    if at and len(loc) > at and loc[at] in FORM_TAGS:
        return loc[:at] + loc[at + 1 :]
    return loc


def _format_validation(where: str, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in _without_form_tag(err["loc"])) or "(top level)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"{where}: key '{key}': {msg}")
    return "\n".join(lines)


def parse_date(value: str | dt.date, what: str = "--date") -> dt.date:
    """A logical date from `YYYY-MM-DD` (or a date; a datetime gives its date)."""
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value).strip())
    except ValueError:
        raise SpecError(f"{what} {value!r}: expected a date as YYYY-MM-DD") from None


# strftime directives that Python documents plus the C99/POSIX ones glibc has (%F, %e, ...).
_DIRECTIVES = set("aAbBcCdDeFgGhHIjmMpRSTuUVwWxXyYzZf%")


def _check_date_format(key: str, template: str, fmt: str) -> None:
    directives = re.findall(r"%(.?)", fmt)
    if not directives:
        raise SpecError(
            f"{key}: {template!r}: {{date:{fmt}}} has no strftime directive "
            "(e.g. {date:%Y/%m/%d})"
        )
    for d in directives:
        if d not in _DIRECTIVES:
            shown = f"%{d}" if d else "a lone % at the end"
            raise SpecError(
                f"{key}: {template!r}: bad date format {fmt!r}: {shown} is not a strftime "
                "directive (e.g. %Y %m %d %j; %% for a literal %)"
            )


def _fill_date(key: str, template: str, day: dt.date) -> tuple[str, bool]:
    """(`template` with `{date}` / `{date:FMT}` filled in, whether it used the date)."""
    if "{" not in template and "}" not in template:
        return template, False
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise SpecError(
            f"{key}: {template!r}: {exc} (write {{{{ and }}}} for literal braces)"
        ) from None
    out, used = [], False
    for literal, field, fmt, conversion in parts:
        out.append(literal)
        if field is None:
            continue
        if field != "date" or conversion:
            shown = "{" + field + (f"!{conversion}" if conversion else "") + "}"
            raise SpecError(
                f"{key}: {template!r}: unknown placeholder {shown}; the known ones are {{date}} "
                "(YYYY-MM-DD) and {date:FORMAT} (strftime, e.g. {date:%Y/%m/%d})"
            )
        used = True
        if fmt:
            _check_date_format(key, template, fmt)
            out.append(day.strftime(fmt))
        else:
            out.append(day.isoformat())
    return "".join(out), used


def _validate(doc: Any, where: str, overrides: dict[str, Any] | None, date: Any) -> JobSpec:
    """Validate a spec mapping (after applying `--set` overrides), fill in `{date}` and
    resolve its paths. It is recorded in `JobSpec.date` when it was given, the spec has a
    schedule, or a path uses it."""
    if not isinstance(doc, dict):
        raise SpecError(
            f"{where}: expected a YAML mapping at the top level, got {type(doc).__name__}"
        )
    doc = copy.deepcopy(doc)  # the caller's mapping stays as it was
    for key, value in (overrides or {}).items():
        set_dotted(doc, key, value)
    if doc.pop("date", None) is not None:
        raise SpecError(
            f"{where}: key 'date': the logical date is not written in the spec; pass --date "
            "YYYY-MM-DD (or date= from Python)"
        )
    try:
        spec = JobSpec.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(_format_validation(where, exc)) from None
    day = parse_date(date) if date is not None else None
    if day is None:
        day = spec.schedule.today() if spec.schedule else dt.datetime.now(dt.timezone.utc).date()
    input_path, used_in = _fill_date("input.path", spec.input.path, day)
    onnx, used_model = _fill_date("model.onnx", spec.model.onnx, day)
    output_path, used_out = _fill_date("output.path", spec.output.path, day)
    dated = date is not None or spec.schedule is not None or used_in or used_model or used_out
    return spec.model_copy(
        update={
            "input": spec.input.model_copy(update={"path": absolute(input_path)}),
            "model": spec.model.model_copy(update={"onnx": absolute(onnx)}),
            "output": spec.output.model_copy(update={"path": absolute(output_path)}),
            "date": day.isoformat() if dated else None,
        }
    )


def load_document(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A spec file's YAML as written; errors name the file and the line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{p}: no such job spec file") from None
    except OSError as exc:
        raise SpecError(f"{p}: cannot read the job spec ({exc.strerror})") from None
    except UnicodeDecodeError as exc:
        line = exc.object.count(b"\n", 0, exc.start) + 1
        raise SpecError(
            f"{p}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at line {line}); save it "
            "as UTF-8"
        ) from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(f"{p}: malformed YAML{at}: {problem}") from None
    if not isinstance(doc, dict):
        raise SpecError(f"{p}: expected a YAML mapping at the top level, got {type(doc).__name__}")
    return doc


SpecSource = JobSpec | str | os.PathLike[str] | dict[str, Any]


def resolve_spec(
    source: SpecSource,
    overrides: dict[str, Any] | None = None,
    date: dt.date | str | None = None,
    where: str | None = None,
) -> JobSpec:
    """The one way to a validated spec: from a YAML path, a mapping, or a `JobSpec`.

    `overrides` are `--set` pairs ({"batch_size": 256}); `date` is the logical date filled
    into `{date}` (default: today in the schedule's time zone, UTC without one). A `JobSpec`
    is returned as it is: it was resolved for its own date, and another needs the source.
    """
    if isinstance(source, JobSpec):
        day = parse_date(date) if date is not None else None
        if overrides or (day is not None and source.date != day.isoformat()):
            raise SpecError(
                f"a JobSpec loaded for {source.date or 'no date'} cannot take overrides or "
                "another date; pass the spec as a path or a mapping"
            )
        return source
    if isinstance(source, dict):
        return _validate(source, where or "spec", overrides, date)
    return _validate(load_document(source), where or str(source), overrides, date)
