"""Scheduled runs: next run times, backfill, and ready-to-install timer definitions.

A spec with `schedule: {cron: "0 2 * * *", timezone: "Europe/Berlin"}` runs once per
schedule; each run fills `{date}` in its paths with the date in the schedule's time zone
when it starts. `batch-infer schedule --emit` writes a crontab block (CRON_TZ=), systemd
units (OnCalendar= converted from the cron expression), a Kubernetes CronJob whose pod runs
one KubeRay RayJob per run and exits with its exit code, or KubeRay's RayCronJob. The texts
are package data (`templates/`), filled with `string.Template`. `batch-infer backfill` runs
every scheduled date in a range, oldest first, skipping dates whose output is complete.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import importlib.resources
import itertools
import json
import os
import re
import shlex
import shutil
import string
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from croniter import croniter
from rich.console import Console

from batch_infer.errors import OutputError, SpecError, UserError
from batch_infer.location import is_uri, open_location
from batch_infer.sink.manifest import SUCCESS, RunRecord
from batch_infer.spec import (
    JobSpec,
    ScheduleSpec,
    add_spec_arguments,
    parse_date,
    parse_overrides,
    resolve_spec,
)

EMITTERS = ("cron", "systemd", "kubernetes", "raycronjob")
SPEC_MOUNT = "/etc/batch-infer"  # where the Kubernetes pods see the spec (and the RayJob)
SPEC_FILE = "job.yaml"  # the spec's key in the ConfigMap
K8S_NAME_MAX = 36  # KubeRay: RayCronJob names <= 36, RayJob <= 47 (generateName adds 5)
TTL_SECONDS = 600  # KubeRay deletes a finished RayJob's RayCluster after this long
WIND_DOWN_SECONDS = 600  # the CronJob's pod outlives its RayJob's deadline by this much
# The CronJob's pod only runs kubectl: a small image, pinned, instead of the TensorRT one.
KUBECTL_IMAGE = "bitnami/kubectl:1.33.4"

# --------------------------------------------------------------------------- times


def next_runs(
    schedule: ScheduleSpec, count: int, after: dt.datetime | None = None
) -> list[dt.datetime]:
    """The next `count` run times strictly after `after` (default: now), in the schedule's
    time zone. A naive `after` is read in that time zone.

    A wall-clock time that happens twice (the hour repeated when summer time ends) runs once,
    at its first occurrence, as cron and systemd do; croniter alone would give both.
    """
    tz = schedule.tz
    base = after or dt.datetime.now(tz)
    base = base.replace(tzinfo=tz) if base.tzinfo is None else base.astimezone(tz)
    it = croniter(schedule.cron, base)
    out: list[dt.datetime] = []
    while len(out) < count:
        when = it.get_next(dt.datetime).astimezone(tz)
        if when.fold == 1 and when.replace(fold=0).utcoffset() != when.utcoffset():
            continue  # the second pass through a repeated hour
        out.append(when)
    return out


def dst_caveat(schedule: ScheduleSpec) -> str | None:
    """A warning when the schedule can fire when clocks change (01:00-03:59 local, in a zone
    with summer time): cron, systemd and Kubernetes treat skipped and repeated times apart."""
    tz = schedule.tz
    year = dt.datetime.now(tz).year
    offsets = {dt.datetime(year, m, 1, 12, tzinfo=tz).utcoffset() for m in (1, 7)}
    hours = croniter.expand(schedule.cron)[0][1]
    if len(offsets) == 1 or not (hours == ["*"] or {1, 2, 3} & {int(h) for h in hours}):
        return None
    return (
        f"{schedule.cron!r} can fire while clocks change in {schedule.timezone}: a time skipped "
        "in spring runs late under cron and not at all under systemd; prefer 04:00-23:59"
    )


def scheduled_dates(schedule: ScheduleSpec | None, start: dt.date, end: dt.date) -> list[dt.date]:
    """The logical dates from `start` to `end` (inclusive) on which the schedule runs at
    least once; every date without a schedule."""
    out: list[dt.date] = []
    day = start
    while day <= end:
        if schedule is None:
            out.append(day)
        else:
            midnight = dt.datetime.combine(day, dt.time(0), schedule.tz)
            fire = croniter(schedule.cron, midnight - dt.timedelta(seconds=1)).get_next(dt.datetime)
            day = fire.astimezone(schedule.tz).date()
            if day > end:
                break
            out.append(day)
        day += dt.timedelta(days=1)
    return out


# --------------------------------------------------------------------------- systemd

_WEEKDAYS = ("Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat")


def _runs_of(values: list[int]) -> list[tuple[int, int]]:
    runs: list[tuple[int, int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], v)
        else:
            runs.append((v, v))
    return runs


def _calendar_field(values: list[Any], high: int) -> str:
    """One croniter-expanded field as a systemd calendar component."""
    if values == ["*"]:
        return "*"
    vals = sorted({int(v) for v in values})
    step = vals[1] - vals[0] if len(vals) >= 3 else 0
    if (
        step > 1
        and all(b - a == step for a, b in itertools.pairwise(vals))
        and vals[-1] + step > high
    ):
        return f"{vals[0]:02d}/{step}"  # systemd repeats up to the field's maximum, as cron does
    return ",".join(f"{a:02d}" if a == b else f"{a:02d}..{b:02d}" for a, b in _runs_of(vals))


def _weekdays(values: list[Any]) -> str:
    monday_first = sorted({(int(v) - 1) % 7 for v in values})  # Mon=0 .. Sun=6
    parts = []
    for a, b in _runs_of(monday_first):
        names = [_WEEKDAYS[(i + 1) % 7] for i in (a, b)]
        if b - a >= 2:
            parts.append(f"{names[0]}..{names[1]}")
        else:
            parts.extend(_WEEKDAYS[(i + 1) % 7] for i in range(a, b + 1))
    return ",".join(parts)


def oncalendar(schedule: ScheduleSpec) -> list[str]:
    """systemd OnCalendar= expressions that fire exactly when the cron expression does.

    cron runs a job when the day of month *or* the day of week matches if both are
    restricted; systemd requires both, so that case becomes two expressions (a timer fires
    on the union of its OnCalendar= lines).
    """
    (minute, hour, dom, month, dow), _ = croniter.expand(schedule.cron)
    time = f"{_calendar_field(hour, 23)}:{_calendar_field(minute, 59)}:00"
    months = _calendar_field(month, 12)
    days = _calendar_field(dom, 31)
    tz = schedule.timezone
    if dow == ["*"]:
        return [f"*-{months}-{days} {time} {tz}"]
    weekdays = _weekdays(dow)
    if dom == ["*"]:
        return [f"{weekdays} *-{months}-* {time} {tz}"]
    return [f"*-{months}-{days} {time} {tz}", f"{weekdays} *-{months}-* {time} {tz}"]


# --------------------------------------------------------------------------- emitters


Emitted = dict[str, str]  # what `batch-infer schedule --emit` writes: file name -> text


def template(name: str) -> str:
    """A template shipped as package data (batch_infer/ops/templates/)."""
    return importlib.resources.files(__package__).joinpath("templates", name).read_text()


def _fill(name: str, /, **values: Any) -> str:
    return string.Template(template(name)).substitute(values)


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so scripts and specs stay readable; no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True

    def represent_str(self, data: str) -> yaml.ScalarNode:
        style = "|" if "\n" in data else None
        return self.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _Dumper.represent_str)


def _dump(*docs: dict[str, Any]) -> str:
    return "---\n".join(
        yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
        for d in docs
    )


def _manifests(name: str, /, **values: Any) -> tuple[str, list[dict[str, Any]]]:
    """A Kubernetes template filled in: (its leading comment block, with the values as text;
    its documents, with each value as a YAML scalar, mapping or list: JSON is valid YAML)."""
    text = template(name)
    head = "".join(itertools.takewhile(lambda ln: ln.startswith("#"), text.splitlines(True)))
    header = string.Template(head).substitute(values)
    body = string.Template(text[len(head) :]).substitute(
        {key: json.dumps(value) for key, value in values.items()}
    )
    return header, list(yaml.safe_load_all(body))


def _program() -> list[str]:
    exe = shutil.which("batch-infer")
    return [exe] if exe else [sys.executable, "-m", "batch_infer.cli"]


def _run_argv(spec_path: str, sets: list[str], program: list[str]) -> list[str]:
    return [*program, "run", "-q", spec_path, *(a for pair in sets for a in ("--set", pair))]


def _describe(spec: JobSpec, schedule: ScheduleSpec) -> str:
    return f"batch-infer job {spec.name}: {schedule.cron!r} in {schedule.timezone}"


def emit_cron(
    spec: JobSpec, spec_path: str, sets: list[str], address: str | None, workdir: str
) -> Emitted:
    schedule = _schedule_of(spec)
    command = f"cd {shlex.quote(workdir)} && "
    if address:
        command += f"RAY_ADDRESS={shlex.quote(address)} "
    command += shlex.join(_run_argv(spec_path, sets, _program()))
    text = _fill(
        "crontab",
        describe=_describe(spec, schedule),
        timezone=schedule.timezone,
        cron=schedule.cron,
        command=command.replace("%", "\\%"),  # cron turns an unescaped % into a newline
    )
    return {f"batch-infer-{spec.name}.crontab": text}


def _systemd_quote(arg: str) -> str:
    arg = arg.replace("%", "%%").replace("$", "$$")  # specifiers and variable expansion
    if arg and not re.search(r"[\s\"'\\;]", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def emit_systemd(
    spec: JobSpec, spec_path: str, sets: list[str], address: str | None, workdir: str
) -> Emitted:
    schedule = _schedule_of(spec)
    unit = f"batch-infer-{spec.name}"
    calendars = oncalendar(schedule)
    common = {"describe": _describe(spec, schedule), "unit": unit, "name": spec.name}
    service = _fill(
        "systemd.service",
        **common,
        workdir=_systemd_quote(workdir),
        environment=f"Environment={_systemd_quote('RAY_ADDRESS=' + address)}\n" if address else "",
        exec_start=" ".join(_systemd_quote(a) for a in _run_argv(spec_path, sets, _program())),
    )
    timer = _fill(
        "systemd.timer",
        **common,
        cron=schedule.cron,
        timezone=schedule.timezone,
        first_calendar=calendars[0],
        calendars="".join(f"OnCalendar={c}\n" for c in calendars),
    )
    return {f"{unit}.service": service, f"{unit}.timer": timer}


def k8s_name(name: str) -> str:
    """A spec name as a DNS-1123 label short enough for every object KubeRay derives."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:K8S_NAME_MAX].strip("-")
    return out or "batch-infer"


@dataclass(frozen=True)
class KubeOptions:
    image: str
    workers: int = 1
    gpus_per_worker: int = 1
    ray_version: str = ""  # default: the Ray installed here
    kubectl_image: str = KUBECTL_IMAGE
    deadline_hours: float = 24.0


def emit_kubernetes(
    spec: JobSpec, spec_text: str, sets: list[str], opts: KubeOptions, kind: str = "kubernetes"
) -> Emitted:
    """The CronJob (`kind` kubernetes) or the RayCronJob (raycronjob) of a scheduled spec,
    with the ConfigMap that holds `spec_text` and, for the CronJob, the RayJob, the pod's
    script and its RBAC. Every template gets every value and uses those it names."""
    schedule, name = _schedule_of(spec), k8s_name(spec.name)
    deadline = max(1, round(opts.deadline_hours * 3600))
    values: dict[str, Any] = {
        "describe": _describe(spec, schedule),
        "name": name,
        "configmap": f"{name}-spec",
        "account": f"{name}-submitter",
        "mount": SPEC_MOUNT,
        "spec_file": SPEC_FILE,
        "spec_text": spec_text,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
        "deadline_hours": f"{opts.deadline_hours:g}",
        "pod_deadline": deadline + WIND_DOWN_SECONDS,
        "kubectl_image": opts.kubectl_image,
        "script": template("submit.sh"),
        "script_path": f"{SPEC_MOUNT}/submit.sh",
    }
    _, [rayjob] = _manifests(
        "rayjob.yaml",
        **values,
        generate_name=f"{name}-",  # each run creates its own RayJob
        entrypoint=shlex.join(_run_argv(f"{SPEC_MOUNT}/{SPEC_FILE}", sets, ["batch-infer"])),
        ttl=TTL_SECONDS,
        deadline=deadline,
        ray_version=opts.ray_version or importlib.metadata.version("ray"),
        image=opts.image,
        workers=opts.workers,
        gpus=str(opts.gpus_per_worker),
    )
    file = "cronjob.yaml" if kind == "kubernetes" else "raycronjob.yaml"
    header, docs = _manifests(file, **values, rayjob=_dump(rayjob), rayjob_spec=rayjob["spec"])
    return {f"{name}-{file}": header + _dump(*docs)}


def _schedule_of(spec: JobSpec) -> ScheduleSpec:
    if spec.schedule is None:
        raise SpecError(
            f"spec {spec.name!r} has no schedule; add e.g. "
            "schedule: {cron: '0 2 * * *', timezone: UTC}"
        )
    return spec.schedule


# --------------------------------------------------------------------------- backfill


@dataclass
class BackfillResult:
    ran: list[tuple[dt.date, RunRecord]] = field(default_factory=list)
    skipped: list[dt.date] = field(default_factory=list)  # complete before (_SUCCESS)
    failed: list[tuple[dt.date, UserError]] = field(default_factory=list)


def backfill_plan(
    source: str | os.PathLike[str] | dict[str, Any],
    start: dt.date | str,
    end: dt.date | str,
    overrides: dict[str, Any] | None = None,
) -> list[tuple[dt.date, JobSpec, bool]]:
    """(date, its spec, whether its output is complete already) for every scheduled date
    from `start` to `end`, oldest first. Refuses dates that would share one output."""
    first, last = parse_date(start, "--from"), parse_date(end, "--to")
    if first > last:
        raise UserError(f"--from {first} is after --to {last}")
    schedule = resolve_spec(source, overrides, first).schedule
    plan = []
    seen: dict[str, dt.date] = {}
    for day in scheduled_dates(schedule, first, last):
        spec = resolve_spec(source, overrides, day)
        if spec.output.path in seen:
            raise SpecError(
                f"output.path: {seen[spec.output.path]} and {day} both write to "
                f"{spec.output.path}; put {{date}} in output.path so each date has its own output"
            )
        seen[spec.output.path] = day
        done = open_location(spec.output.path, "output.path", OutputError).exists(SUCCESS)
        plan.append((day, spec, done))
    return plan


def backfill(
    source: str | os.PathLike[str] | dict[str, Any],
    start: dt.date | str,
    end: dt.date | str,
    *,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
    continue_on_error: bool = False,
    on_date: Callable[[dt.date, str, RunRecord | UserError | None], None] | None = None,
) -> BackfillResult:
    """Run every scheduled date from `start` to `end` (inclusive), oldest first, in this
    process; a date whose output holds `_SUCCESS` is skipped, an incomplete one resumed.

    A date that fails stops the backfill (its exception propagates) unless
    `continue_on_error`: then it is recorded in `failed` and the next date runs.
    `on_date(date, "skipped" | "ran" | "failed", summary or error)` reports progress.
    """
    result, tell = BackfillResult(), on_date or (lambda *_: None)
    for day, spec, done in backfill_plan(source, start, end, overrides):
        if done:
            result.skipped.append(day)
            tell(day, "skipped", None)
            continue
        from batch_infer.job import run  # Ray loads only when a date runs

        try:
            summary = run(spec, progress=progress)
        except UserError as exc:
            if not continue_on_error:
                raise
            result.failed.append((day, exc))
            tell(day, "failed", exc)
            continue
        result.ran.append((day, summary))
        tell(day, "ran", summary)
    return result


# --------------------------------------------------------------------------- command line


def _parse_after(text: str, schedule: ScheduleSpec) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--after {text!r}: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None
    return when.replace(tzinfo=schedule.tz) if when.tzinfo is None else when


def _cmd_next(args: argparse.Namespace, spec: JobSpec, err: Console) -> int:
    schedule = _schedule_of(spec)
    if args.next < 1:
        raise UserError(f"--next {args.next}: expected a count of 1 or more")
    after = _parse_after(args.after, schedule) if args.after else None
    times = next_runs(schedule, args.next, after)
    if args.json:  # each run's time and the logical date it fills into {date}
        rows = [json.dumps({"time": t.isoformat(), "date": t.date().isoformat()}) for t in times]
        print("[" + ",\n ".join(rows) + "]")
        return 0
    err.print(f"next {args.next} run(s) of {spec.name}: {schedule.cron} in {schedule.timezone}")
    for when in times:
        print(when.isoformat())
    return 0


def _kube_options(args: argparse.Namespace, spec: JobSpec, err: Console) -> KubeOptions:
    if args.address:
        raise UserError(
            f"--address does not apply to --emit {args.emit}: each run's RayJob brings its own "
            "Ray cluster"
        )
    if not args.image:
        raise UserError(f"--emit {args.emit} needs --image (built from cluster/Dockerfile)")
    if min(args.workers, args.gpus_per_worker) < 1 or args.deadline <= 0:
        raise UserError("--workers and --gpus-per-worker must be 1 or more, --deadline > 0")
    paths = {"input.path": spec.input, "output.path": spec.output}
    local = [k for k, v in paths.items() if not is_uri(v.path)]
    local += [] if is_uri(spec.model.onnx) else ["model.onnx"]
    if local:
        err.print(
            f"warning: local path(s) in {', '.join(local)}: the Ray pods must see them at the "
            "same place (a shared volume), or use s3://, gs://, ..."
        )
    opts = (args.workers, args.gpus_per_worker, args.ray_version or "", args.kubectl_image)
    return KubeOptions(args.image, *opts, deadline_hours=args.deadline)


def _cmd_schedule(args: argparse.Namespace) -> int:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    spec = resolve_spec(args.spec, parse_overrides(args.set))
    if args.next is not None:
        return _cmd_next(args, spec, err)
    caveat = dst_caveat(_schedule_of(spec))
    if caveat:
        err.print(f"warning: {caveat}")
    if args.emit in ("cron", "systemd"):
        emit = emit_cron if args.emit == "cron" else emit_systemd
        spec_path = str(Path(args.spec).absolute())
        emitted = emit(spec, spec_path, args.set, args.address, os.getcwd())
    else:
        opts = _kube_options(args, spec, err)
        emitted = emit_kubernetes(spec, Path(args.spec).read_text(), args.set, opts, args.emit)
    if not args.out:
        texts = [f"# ---- {name} ----\n{body}" for name, body in emitted.items()]
        sys.stdout.write("\n".join(texts) if len(texts) > 1 else next(iter(emitted.values())))
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name, body in emitted.items():
        (Path(args.out) / name).write_text(body)
        err.print(f"wrote {Path(args.out) / name}")
    return 0


def _cmd_backfill(args: argparse.Namespace) -> int:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    overrides = parse_overrides(args.set)
    if args.dry_run:
        plan = backfill_plan(args.spec, args.start, args.end, overrides)
        for day, spec, done in plan:
            print(f"{day}  {'skip (complete)' if done else 'run'}  {spec.output.path}")
        todo = sum(not done for _, _, done in plan)
        err.print(f"backfill --dry-run: {todo} to run, {len(plan) - todo} to skip")
        return 0

    def report(day: dt.date, what: str, s: RunRecord | UserError | None) -> None:
        if isinstance(s, RunRecord):
            what = f"{s.status}, {s.rows_this_run:,} rows in {s.seconds:.1f} s -> {s.output}"
        err.print(f"{day}: {what}" + (f": {s}" if isinstance(s, UserError) else ""))

    result = backfill(
        args.spec,
        args.start,
        args.end,
        overrides=overrides,
        progress=not args.quiet,
        continue_on_error=args.continue_on_error,
        on_date=report,
    )
    err.print(
        f"backfill: {len(result.ran)} succeeded, {len(result.failed)} failed, "
        f"{len(result.skipped)} skipped"
    )
    return result.failed[0][1].exit_code if result.failed else 0


def register(subparsers: Any) -> None:
    """Add the `schedule` and `backfill` subcommands to batch-infer's command line."""
    s = subparsers.add_parser(
        "schedule",
        help="write cron / systemd / Kubernetes definitions of a scheduled spec, or its next runs",
        description="Needs a spec with schedule: {cron: ..., timezone: ...}. Writes to stdout "
        "unless --out DIR is given.",
    )
    s.add_argument("spec", help="the job spec (YAML) with a schedule")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--emit", choices=EMITTERS, help="what to write")
    what.add_argument("--next", type=int, metavar="N", help="print the next N run times")
    s.add_argument("--after", metavar="YYYY-MM-DD[THH:MM]", help="with --next: count from this "
                   "time in the schedule's time zone (default: now)")  # fmt: skip
    s.add_argument("--json", action="store_true", help="with --next: a JSON array of {time, date}")
    s.add_argument("--out", metavar="DIR", help="write the files into DIR instead of stdout")
    add_spec_arguments(s)  # the overrides are passed on to every scheduled run
    s.add_argument("--address", help="cron/systemd: the Ray cluster each run joins (RAY_ADDRESS, "
                   "e.g. head:6379; default: a local Ray started by the run)")  # fmt: skip
    s.add_argument("--image", help="kubernetes/raycronjob: the image built from cluster/Dockerfile")
    s.add_argument("--kubectl-image", default=KUBECTL_IMAGE, help="kubernetes: the CronJob pod's "
                   f"image, any with sh and kubectl (default: {KUBECTL_IMAGE})")  # fmt: skip
    s.add_argument("--workers", type=int, default=1, help="kubernetes: GPU worker pods per run")
    s.add_argument("--gpus-per-worker", type=int, default=1, help="kubernetes: GPUs per worker pod")
    s.add_argument("--deadline", type=float, default=24.0, metavar="HOURS", help="kubernetes: end "
                   "a run still going after this long (default: 24)")  # fmt: skip
    s.add_argument("--ray-version", help="kubernetes: the image's Ray (default: the one here)")
    s.set_defaults(func=_cmd_schedule)

    b = subparsers.add_parser("backfill", help="run every scheduled date from D1 to D2, oldest "
                              "first, skipping complete ones")  # fmt: skip
    b.add_argument("spec", help="the job spec (YAML); output.path must use {date}")
    b.add_argument("--from", dest="start", required=True, metavar="YYYY-MM-DD")
    b.add_argument("--to", dest="end", required=True, metavar="YYYY-MM-DD")
    add_spec_arguments(b)
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    b.add_argument("--dry-run", action="store_true", help="list the dates it would run and skip")
    b.add_argument("--continue-on-error", action="store_true", help="run every date even when "
                   "one fails; exit with the first failure's code")  # fmt: skip
    b.set_defaults(func=_cmd_backfill)
