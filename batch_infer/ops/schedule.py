"""Scheduled runs: next run times, backfill, and timer definitions to install (cron, systemd,
a Kubernetes CronJob of KubeRay RayJobs, KubeRay's RayCronJob); docs/operations.md, Schedule.
The timers' texts are package data (templates/), filled in with `string.Template`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import itertools
import json
import operator
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

from batch_infer.errors import OutputError, SpecError, UserError
from batch_infer.location import is_uri, open_location
from batch_infer.ops import json_rows, note, quiet_pipe, template
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
KUBECTL_IMAGE = "bitnamilegacy/kubectl:1.33.4"
_WEEKDAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")


def next_runs(
    schedule: ScheduleSpec, count: int, after: dt.datetime | None = None
) -> list[dt.datetime]:
    """The next `count` run times strictly after `after` (default: now; naive: read in the
    schedule's time zone), in that zone. A wall-clock time that happens twice (summer time
    ends) runs once, at its first pass, as cron and systemd do; croniter alone gives both."""
    from croniter import croniter  # imported by the commands that need it: not `run`

    tz = schedule.tz
    base = after or dt.datetime.now(tz)
    base = base.replace(tzinfo=tz) if base.tzinfo is None else base.astimezone(tz)
    it = croniter(schedule.cron, base)  # croniter reads the expression in base's zone
    out: list[dt.datetime] = []
    while len(out) < count:
        when = it.get_next(dt.datetime).astimezone(tz)
        if when.fold == 0 or when.replace(fold=0).utcoffset() == when.utcoffset():
            out.append(when)
    return out


def changing_hours(tz: dt.tzinfo, year: int) -> list[int]:
    """The local hours in which `tz` changes its clocks during `year`: the hour skipped in
    spring and the one repeated in autumn, wherever the zone puts them (02:00 in Berlin,
    23:00 in Nuuk, 00:00 and 23:00 in Santiago)."""
    step, utc = dt.timedelta(minutes=15), dt.timezone.utc
    t = dt.datetime(year, 1, 1, tzinfo=utc)
    before, hours = t.astimezone(tz).utcoffset(), set()
    while t.year == year:
        t += step
        if (after := t.astimezone(tz).utcoffset()) != before:  # the change is at t
            assert before is not None and after is not None
            wall, end = (t.replace(tzinfo=None) + o for o in sorted((before, after)))
            while wall < end:  # the wall-clock times skipped or repeated
                hours.add(wall.hour)
                wall += step
            before = after
    return sorted(hours)


def dst_caveat(schedule: ScheduleSpec) -> str | None:
    """A warning when the schedule can fire in an hour in which the clocks change in its
    zone: cron, systemd and Kubernetes treat skipped and repeated times apart."""
    from croniter import croniter

    hours = croniter.expand(schedule.cron)[0][1]
    changing = changing_hours(schedule.tz, dt.datetime.now(schedule.tz).year)
    if not changing or not (hours == ["*"] or set(changing) & {int(h) for h in hours}):
        return None
    when = ", ".join(f"{h:02d}:00-{h:02d}:59" for h in changing)
    return (
        f"{schedule.cron!r} can fire while clocks change in {schedule.timezone} ({when}): a "
        "time skipped in spring runs late under cron and not at all under systemd; prefer "
        "another hour"
    )


def scheduled_dates(schedule: ScheduleSpec | None, start: dt.date, end: dt.date) -> list[dt.date]:
    """The dates from `start` to `end` (inclusive) on which the schedule runs at least once;
    every date without a schedule."""
    out, day = [], start
    while day <= end:
        if schedule is not None:  # the date of its first run from this day's midnight on
            before = dt.datetime.combine(day, dt.time(0)) - dt.timedelta(seconds=1)
            day = next_runs(schedule, 1, before)[0].date()
        if day <= end:
            out.append(day)
        day += dt.timedelta(days=1)
    return out


def _calendar_field(values: list[Any], high: int, names: tuple[str, ...] = ()) -> str:
    """One croniter-expanded field as a systemd calendar component: `*`; `a/step` where cron's
    step repeats up to the field's maximum (systemd's does too); else values and a..b ranges."""
    if values == ["*"]:
        return "*"
    nums = sorted({int(v) for v in values})
    step = nums[1] - nums[0] if len(nums) > 2 else 0
    if step > 1 and not names and nums == list(range(nums[0], high + 1, step)):
        return f"{nums[0]:02d}/{step}"
    name = names.__getitem__ if names else "{:02d}".format
    runs = [[v for _, v in g] for _, g in itertools.groupby(enumerate(nums), lambda p: p[1] - p[0])]
    return ",".join(name(r[0]) + (f"..{name(r[-1])}" if len(r) > 1 else "") for r in runs)


def oncalendar(schedule: ScheduleSpec) -> list[str]:
    """systemd OnCalendar= expressions that fire exactly when the cron expression does. cron
    runs when the day of month *or* the day of week matches if both are restricted; systemd
    wants both, so that case becomes two expressions (a timer fires on their union)."""
    from croniter import croniter

    (minute, hour, dom, month, dow), _ = croniter.expand(schedule.cron)
    time = f"{_calendar_field(hour, 23)}:{_calendar_field(minute, 59)}:00 {schedule.timezone}"
    months = _calendar_field(month, 12)
    days = f"*-{months}-{_calendar_field(dom, 31)} {time}"
    if dow == ["*"]:
        return [days]
    weekdays = _calendar_field([(int(d) - 1) % 7 for d in dow], 6, _WEEKDAYS)  # Mon=0 .. Sun=6
    weeks = f"{weekdays} *-{months}-* {time}"
    return [weeks] if dom == ["*"] else [days, weeks]


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


def _systemd_quote(arg: str) -> str:
    arg = arg.replace("%", "%%").replace("$", "$$")  # specifiers and variable expansion
    if arg and not re.search(r"[\s\"'\\;]", arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def k8s_name(name: str) -> str:
    """A spec name as a DNS-1123 label short enough for every object KubeRay derives."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:K8S_NAME_MAX].strip("-")
    return out or "batch-infer"


def _run_args(args: argparse.Namespace, spec_path: str, program: list[str]) -> list[str]:
    """The command line of each run: the overrides given here are passed on to every run."""
    return [*program, "run", "-q", spec_path, *(a for pair in args.set for a in ("--set", pair))]


def _emit_timer(args: argparse.Namespace, spec: JobSpec, values: dict[str, Any]) -> dict[str, str]:
    """A crontab block, or a systemd service and timer, that run the spec here."""
    exe = shutil.which("batch-infer")
    program = [exe] if exe else [sys.executable, "-m", "batch_infer.cli"]
    argv = _run_args(args, str(Path(args.spec).absolute()), program)
    unit = f"batch-infer-{spec.name}"
    if args.emit == "cron":
        address = f"RAY_ADDRESS={shlex.quote(args.address)} " if args.address else ""
        command = f"cd {shlex.quote(os.getcwd())} && {address}{shlex.join(argv)}"
        command = command.replace("%", "\\%")  # cron turns an unescaped % into a newline
        return {f"{unit}.crontab": _fill("crontab", **values, command=command)}
    address = _systemd_quote(f"RAY_ADDRESS={args.address}") if args.address else ""
    calendars = oncalendar(spec.schedule)
    service = _fill(
        "systemd.service",
        **values,
        unit=unit,
        workdir=os.getcwd().replace("%", "%%"),  # one path, taken as written: no quotes
        environment=f"Environment={address}\n" if address else "",
        exec_start=" ".join(map(_systemd_quote, argv)),
    )
    timer = _fill(
        "systemd.timer",
        **values,
        unit=unit,
        first_calendar=calendars[0],
        calendars="".join(f"OnCalendar={c}\n" for c in calendars),
    )
    return {f"{unit}.service": service, f"{unit}.timer": timer}


def _emit_kubernetes(
    args: argparse.Namespace, spec: JobSpec, values: dict[str, Any]
) -> dict[str, str]:
    """A Kubernetes CronJob whose pod runs one KubeRay RayJob per run, or a RayCronJob."""
    if args.address:
        raise UserError(
            f"--address does not apply to --emit {args.emit}: each run's RayJob brings its own "
            "Ray cluster"
        )
    if not args.image:
        raise UserError(f"--emit {args.emit} needs --image (built from cluster/Dockerfile)")
    if min(args.workers, args.gpus_per_worker) < 1 or args.deadline <= 0:
        raise UserError("--workers and --gpus-per-worker must be 1 or more, --deadline > 0")
    keys = ("input.path", "output.path", "model.onnx")
    if local := [k for k in keys if not is_uri(operator.attrgetter(k)(spec))]:
        note(
            f"warning: local path(s) in {', '.join(local)}: the Ray pods must see them at the "
            "same place (a shared volume), or use s3://, gs://, ..."
        )
    name = values["name"] = k8s_name(spec.name)
    deadline = max(1, round(args.deadline * 3600))
    values |= {
        "configmap": f"{name}-spec",
        "account": f"{name}-submitter",
        "mount": SPEC_MOUNT,
        "spec_file": SPEC_FILE,
        "spec_text": Path(args.spec).read_text(),
        "deadline_hours": f"{args.deadline:g}",
        "pod_deadline": deadline + WIND_DOWN_SECONDS,
        "kubectl_image": args.kubectl_image,
        "script": template("submit.sh"),
        "script_path": f"{SPEC_MOUNT}/submit.sh",
    }
    _, [rayjob] = _manifests(
        "rayjob.yaml",
        **values,
        generate_name=f"{name}-",  # each run creates its own RayJob
        entrypoint=shlex.join(_run_args(args, f"{SPEC_MOUNT}/{SPEC_FILE}", ["batch-infer"])),
        ttl=TTL_SECONDS,
        deadline=deadline,
        ray_version=args.ray_version or importlib.metadata.version("ray"),
        image=args.image,
        workers=args.workers,
        gpus=str(args.gpus_per_worker),
    )
    file = "cronjob.yaml" if args.emit == "kubernetes" else "raycronjob.yaml"
    header, docs = _manifests(file, **values, rayjob=_dump(rayjob), rayjob_spec=rayjob["spec"])
    return {f"{name}-{file}": header + _dump(*docs)}


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
    plan, seen = [], {}
    for day in scheduled_dates(resolve_spec(source, overrides, first).schedule, first, last):
        spec = resolve_spec(source, overrides, day)
        if (other := seen.setdefault(spec.output.path, day)) != day:
            raise SpecError(
                f"output.path: {other} and {day} both write to {spec.output.path}; put "
                "{date} in output.path so each date has its own output"
            )
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
    process: a date whose output holds `_SUCCESS` is skipped, an incomplete one resumed. A
    date that fails stops the backfill (its error propagates) unless `continue_on_error`.
    `on_date(date, "skipped" | "ran" | "failed", summary or error)` reports progress."""
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
        else:
            result.ran.append((day, summary))
            tell(day, "ran", summary)
    return result


def _cmd_schedule(args: argparse.Namespace) -> int:
    spec = resolve_spec(args.spec, parse_overrides(args.set))
    if (schedule := spec.schedule) is None:
        raise SpecError(
            f"spec {spec.name!r} has no schedule; add e.g. "
            "schedule: {cron: '0 2 * * *', timezone: UTC}"
        )
    if args.next is not None:
        if args.next < 1:
            raise UserError(f"--next {args.next}: expected a count of 1 or more")
        try:
            after = dt.datetime.fromisoformat(args.after) if args.after else None
        except ValueError:
            raise UserError(
                f"--after {args.after!r}: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM"
            ) from None
        times = next_runs(schedule, args.next, after)
        if args.json:  # each run's time and the logical date it fills into {date}
            print(
                json_rows([{"time": t.isoformat(), "date": str(t.date())} for t in times]), end=""
            )
            return 0
        note(f"next {args.next} run(s) of {spec.name}: {schedule.cron} in {schedule.timezone}")
        print("\n".join(t.isoformat() for t in times))
        return 0
    if caveat := dst_caveat(schedule):
        note(f"warning: {caveat}")
    values = {  # every template gets every value and uses those it names
        "describe": f"batch-infer job {spec.name}: {schedule.cron!r} in {schedule.timezone}",
        "name": spec.name,
        "cron": schedule.cron,
        "timezone": schedule.timezone,
    }
    emit = _emit_timer if args.emit in ("cron", "systemd") else _emit_kubernetes
    emitted = emit(args, spec, values)
    if not args.out:
        texts = [f"# ---- {name} ----\n{body}" for name, body in emitted.items()]
        sys.stdout.write("\n".join(texts) if len(texts) > 1 else next(iter(emitted.values())))
        return 0
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for name, body in emitted.items():
        (Path(args.out) / name).write_text(body)
        note(f"wrote {Path(args.out) / name}")
    return 0


def _cmd_backfill(args: argparse.Namespace) -> int:
    overrides = parse_overrides(args.set)
    if args.dry_run:
        plan = backfill_plan(args.spec, args.start, args.end, overrides)
        for day, spec, done in plan:
            print(f"{day}  {'skip (complete)' if done else 'run'}  {spec.output.path}")
        todo = sum(not done for _, _, done in plan)
        note(f"backfill --dry-run: {todo} to run, {len(plan) - todo} to skip")
        return 0

    def report(day: dt.date, what: str, s: RunRecord | UserError | None) -> None:
        if isinstance(s, RunRecord):
            what = f"{s.status}, {s.rows_this_run:,} rows in {s.seconds:.1f} s -> {s.output}"
        note(f"{day}: {what}" + (f": {s}" if isinstance(s, UserError) else ""))

    result = backfill(
        args.spec,
        args.start,
        args.end,
        overrides=overrides,
        progress=not args.quiet,
        continue_on_error=args.continue_on_error,
        on_date=report,
    )
    counts = f"{len(result.ran)} succeeded, {len(result.failed)} failed"
    note(f"backfill: {counts}, {len(result.skipped)} skipped")
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
    s.set_defaults(func=quiet_pipe(_cmd_schedule))

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
    b.set_defaults(func=quiet_pipe(_cmd_backfill))
