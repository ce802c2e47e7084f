"""Scheduled runs: next run times, backfill, and ready-to-install timer definitions.

A spec with `schedule: {cron: "0 2 * * *", timezone: "Europe/Berlin"}` runs once per
schedule; each run fills `{date}` in its paths with the date in the schedule's time zone
when it starts (`batch_infer.spec`). From a spec, `batch-infer schedule` writes:

    cron        a crontab block: CRON_TZ=<zone> and one line
    systemd     batch-infer-<name>.service (oneshot) + batch-infer-<name>.timer (OnCalendar=,
                converted from the cron expression; check it with `systemd-analyze calendar`)
    kubernetes  a CronJob (concurrencyPolicy: Forbid, timeZone) whose pod creates one KubeRay
                RayJob per run and waits for it, plus the ConfigMap and RBAC it needs
    raycronjob  KubeRay's own RayCronJob (KubeRay >= 1.7.0, feature gate RayCronJob)

`batch-infer backfill SPEC --from D1 --to D2` runs every scheduled date in between, oldest
first, in this process, skipping the dates whose output already holds `_SUCCESS`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import itertools
import os
import re
import shlex
import shutil
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
ENGINE_CACHE = "/root/.cache/batch-infer/engines"  # batch-infer's default cache dir, as root
K8S_NAME_MAX = 36  # KubeRay: RayCronJob names <= 36, RayJob <= 47 (generateName adds 5)
TTL_SECONDS = 600  # KubeRay deletes a finished RayJob's RayCluster after this long
POLL_SECONDS = 30

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


@dataclass
class Emitted:
    """What `batch-infer schedule --emit` writes: file name -> text."""

    files: dict[str, str] = field(default_factory=dict)

    def text(self) -> str:
        if len(self.files) == 1:
            return next(iter(self.files.values()))
        return "\n".join(f"# ---- {name} ----\n{body}" for name, body in self.files.items())


def _program() -> list[str]:
    exe = shutil.which("batch-infer")
    return [exe] if exe else [sys.executable, "-m", "batch_infer.cli"]


def _run_argv(spec_path: str, sets: list[str], program: list[str]) -> list[str]:
    argv = [*program, "run", "-q", spec_path]
    for pair in sets:
        argv += ["--set", pair]
    return argv


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
    command = command.replace("%", "\\%")  # cron turns an unescaped % into a newline
    text = (
        f"# {_describe(spec, schedule)}\n"
        "# Install: (crontab -l; cat THIS_FILE) | crontab -     then check: crontab -l\n"
        "# CRON_TZ is honoured by cronie (Fedora, RHEL, Arch, ...) and applies to every line\n"
        "# after it, so keep this block last. A cron without CRON_TZ reads the times in the\n"
        "# system's time zone: use --emit systemd there. The logical date is the date in\n"
        f"# {schedule.timezone} when a run starts; rerunning it resumes. Missed runs are not\n"
        "# caught up: batch-infer backfill SPEC --from D1 --to D2 does that.\n"
        f"CRON_TZ={schedule.timezone}\n"
        f"{schedule.cron} {command}\n"
    )
    return Emitted({f"batch-infer-{spec.name}.crontab": text})


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
    exec_start = " ".join(_systemd_quote(a) for a in _run_argv(spec_path, sets, _program()))
    env = f"Environment={_systemd_quote('RAY_ADDRESS=' + address)}\n" if address else ""
    service = (
        f"# {_describe(spec, schedule)}\n"
        f"# Started by {unit}.timer; run it now with: systemctl start {unit}.service\n"
        "[Unit]\n"
        f"Description=batch-infer job {spec.name}\n"
        "Wants=network-online.target\n"
        "After=network-online.target\n"
        "\n"
        "[Service]\n"
        "Type=oneshot\n"
        f"WorkingDirectory={_systemd_quote(workdir)}\n"
        f"{env}"
        f"ExecStart={exec_start}\n"
    )
    calendars = "".join(f"OnCalendar={c}\n" for c in oncalendar(schedule))
    timer = (
        f"# {_describe(spec, schedule)}\n"
        f"# cron {schedule.cron!r} in {schedule.timezone} as OnCalendar=; check the times with\n"
        f"#   systemd-analyze calendar --iterations=5 '{oncalendar(schedule)[0]}'\n"
        f"# Install both units in ~/.config/systemd/user/ (or /etc/systemd/system/), then:\n"
        f"#   systemctl --user daemon-reload && systemctl --user enable --now {unit}.timer\n"
        "# (a user timer runs while you are logged out after `loginctl enable-linger`).\n"
        "# Persistent= is off: a run missed while the machine was down would start with the\n"
        "# wrong date; batch-infer backfill SPEC --from D1 --to D2 catches up instead.\n"
        "[Unit]\n"
        f"Description=Schedule of batch-infer job {spec.name}\n"
        "\n"
        "[Timer]\n"
        f"{calendars}"
        f"Unit={unit}.service\n"
        "\n"
        "[Install]\n"
        "WantedBy=timers.target\n"
    )
    return Emitted({f"{unit}.service": service, f"{unit}.timer": timer})


class _Dumper(yaml.SafeDumper):
    """Multi-line strings as literal blocks, so scripts and specs stay readable; no anchors."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


def _dump(*docs: dict[str, Any]) -> str:
    return "---\n".join(
        yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)
        for d in docs
    )


def k8s_name(name: str) -> str:
    """A spec name as a DNS-1123 label short enough for every object KubeRay derives."""
    out = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:K8S_NAME_MAX].strip("-")
    return out or "batch-infer"


@dataclass(frozen=True)
class KubeOptions:
    image: str
    workers: int = 1
    gpus_per_worker: int = 1
    ray_version: str = ""
    kubectl_image: str | None = None


def _ray_version() -> str:
    try:
        return importlib.metadata.version("ray")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - ray is a dependency
        return "2.52.0"


def rayjob_spec(name: str, spec_file: str, sets: list[str], opts: KubeOptions) -> dict[str, Any]:
    """A KubeRay RayJob spec: a CPU head (driver only), one GPU worker group, token auth."""
    labels = {"app.kubernetes.io/name": "batch-infer", "batch-infer/job": name}
    entrypoint = shlex.join(_run_argv(f"{SPEC_MOUNT}/{spec_file}", sets, ["batch-infer"]))
    head = {
        "rayStartParams": {"num-cpus": "0"},  # no tasks on the head: it only runs the driver
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "containers": [
                    {
                        "name": "ray-head",
                        "image": opts.image,
                        "resources": {
                            "requests": {"cpu": "2", "memory": "8Gi"},
                            "limits": {"cpu": "2", "memory": "8Gi"},
                        },
                        "ports": [
                            {"containerPort": 6379, "name": "gcs-server"},
                            {"containerPort": 8265, "name": "dashboard"},
                            {"containerPort": 10001, "name": "client"},
                        ],
                        "volumeMounts": [
                            {"name": "job-spec", "mountPath": SPEC_MOUNT, "readOnly": True}
                        ],
                    }
                ],
                "volumes": [
                    {
                        "name": "job-spec",
                        "configMap": {
                            "name": f"{name}-spec",
                            "items": [{"key": spec_file, "path": spec_file}],
                        },
                    }
                ],
            },
        },
    }
    gpu = str(opts.gpus_per_worker)
    worker = {
        "groupName": "gpu",
        # Fixed size: batch-infer starts one actor per GPU it sees when the run starts.
        "replicas": opts.workers,
        "minReplicas": opts.workers,
        "maxReplicas": opts.workers,
        "rayStartParams": {},
        "template": {
            "metadata": {"labels": labels},
            "spec": {
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ],
                "containers": [
                    {
                        "name": "ray-worker",
                        "image": opts.image,
                        "resources": {
                            "requests": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": gpu},
                            "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": gpu},
                        },
                        "volumeMounts": [
                            {"name": "engine-cache", "mountPath": ENGINE_CACHE},
                            {"name": "dshm", "mountPath": "/dev/shm"},
                        ],
                    }
                ],
                "volumes": [
                    {  # TensorRT engines outlive the per-run cluster, one cache per node
                        "name": "engine-cache",
                        "hostPath": {
                            "path": "/var/cache/batch-infer/engines",
                            "type": "DirectoryOrCreate",
                        },
                    },
                    {"name": "dshm", "emptyDir": {"medium": "Memory"}},
                ],
            },
        },
    }
    return {
        "entrypoint": entrypoint,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": TTL_SECONDS,
        "rayClusterSpec": {
            "rayVersion": opts.ray_version or _ray_version(),
            "authOptions": {"mode": "token"},  # KubeRay >= 1.5.1, Ray >= 2.52
            "headGroupSpec": head,
            "workerGroupSpecs": [worker],
        },
    }


def _spec_configmap(name: str, spec_file: str, spec_text: str, extra: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"{name}-spec", "labels": {"app.kubernetes.io/name": "batch-infer"}},
        "data": {spec_file: spec_text, **extra},
    }


def _submit_script(name: str) -> str:
    """The CronJob pod's script: create this run's RayJob, wait for it, exit with its result."""
    return (
        "set -euo pipefail\n"
        f"job=$(kubectl create -f {SPEC_MOUNT}/rayjob.yaml -o jsonpath='{{.metadata.name}}')\n"
        'echo "created rayjob/$job"\n'
        "while true; do\n"
        '  state=$(kubectl get rayjob "$job" '
        "-o jsonpath='{.status.jobDeploymentStatus}/{.status.jobStatus}')\n"
        '  case "$state" in\n'
        '    Complete/SUCCEEDED) echo "rayjob/$job succeeded"; exit 0 ;;\n'
        '    Complete/*|Failed/*|ValidationFailed/*) echo "rayjob/$job: $state"; exit 1 ;;\n'
        "  esac\n"
        f"  sleep {POLL_SECONDS}\n"
        "done\n"
    )


def _k8s_header(spec: JobSpec, schedule: ScheduleSpec, lines: list[str]) -> str:
    return "".join(f"# {line}\n" for line in [_describe(spec, schedule), *lines])


def emit_kubernetes(spec: JobSpec, spec_text: str, sets: list[str], opts: KubeOptions) -> Emitted:
    schedule = _schedule_of(spec)
    name = k8s_name(spec.name)
    spec_file = "job.yaml"
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "generateName": f"{name}-",
            "labels": {"app.kubernetes.io/name": "batch-infer", "batch-infer/job": name},
        },
        "spec": rayjob_spec(name, spec_file, sets, opts),
    }
    sa = f"{name}-submitter"
    docs = [
        _spec_configmap(name, spec_file, spec_text, {"rayjob.yaml": _dump(rayjob)}),
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": sa},
            "rules": [
                {"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": sa},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": sa},
            "subjects": [{"kind": "ServiceAccount", "name": sa}],
        },
        {
            "apiVersion": "batch/v1",
            "kind": "CronJob",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "batch-infer"}},
            "spec": {
                "schedule": schedule.cron,
                "timeZone": schedule.timezone,
                "concurrencyPolicy": "Forbid",  # the pod lives as long as its RayJob
                "startingDeadlineSeconds": 3600,
                "successfulJobsHistoryLimit": 3,
                "failedJobsHistoryLimit": 3,
                "jobTemplate": {
                    "spec": {
                        "backoffLimit": 0,
                        "template": {
                            "spec": {
                                "serviceAccountName": sa,
                                "restartPolicy": "Never",
                                "containers": [
                                    {
                                        "name": "submit",
                                        "image": opts.kubectl_image or opts.image,
                                        "command": ["/bin/bash", "-c", _submit_script(name)],
                                        "volumeMounts": [{"name": "job", "mountPath": SPEC_MOUNT}],
                                    }
                                ],
                                "volumes": [
                                    {
                                        "name": "job",
                                        "configMap": {
                                            "name": f"{name}-spec",
                                            "items": [
                                                {"key": "rayjob.yaml", "path": "rayjob.yaml"}
                                            ],
                                        },
                                    }
                                ],
                            }
                        },
                    }
                },
            },
        },
    ]
    header = _k8s_header(
        spec,
        schedule,
        [
            "A Kubernetes CronJob whose pod creates one KubeRay RayJob per run and waits for it,",
            "so concurrencyPolicy: Forbid keeps runs from overlapping; KubeRay deletes each run's",
            f"RayCluster {TTL_SECONDS} s after its job ends (shutdownAfterJobFinishes).",
            "Needs Kubernetes >= 1.27 (CronJob timeZone), KubeRay >= 1.5.1 with Ray >= 2.52",
            "(authOptions token auth), the NVIDIA device plugin (nvidia.com/gpu), and input and",
            "output paths every Ray pod can reach (s3://, gs://, or a shared volume).",
            "Apply: kubectl apply -n NAMESPACE -f THIS_FILE",
        ],
    )
    return Emitted({f"{name}-cronjob.yaml": header + _dump(*docs)})


def emit_raycronjob(spec: JobSpec, spec_text: str, sets: list[str], opts: KubeOptions) -> Emitted:
    schedule = _schedule_of(spec)
    name = k8s_name(spec.name)
    spec_file = "job.yaml"
    docs = [
        _spec_configmap(name, spec_file, spec_text, {}),
        {
            "apiVersion": "ray.io/v1",
            "kind": "RayCronJob",
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "batch-infer"}},
            "spec": {
                "schedule": schedule.cron,
                "timeZone": schedule.timezone,  # KubeRay >= 1.7.0; before: the operator's zone
                "jobTemplate": rayjob_spec(name, spec_file, sets, opts),
            },
        },
    ]
    header = _k8s_header(
        spec,
        schedule,
        [
            "KubeRay's RayCronJob: the operator creates one RayJob per run. Alpha: needs KubeRay",
            ">= 1.7.0 (spec.timeZone; 1.6 has RayCronJob without it) with the feature gate",
            "RayCronJob enabled (helm: featureGates RayCronJob enabled: true), Ray >= 2.52",
            "(authOptions token auth), the NVIDIA device plugin, and input and output paths every",
            "Ray pod can reach. RayCronJob has no concurrencyPolicy: a run still going when the",
            "next one starts runs beside it (two runs of one date cannot both write: the second",
            "fails on the output's lock). Use --emit kubernetes to forbid overlaps.",
            "Apply: kubectl apply -n NAMESPACE -f THIS_FILE",
        ],
    )
    return Emitted({f"{name}-raycronjob.yaml": header + _dump(*docs)})


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


def backfill(
    source: str | os.PathLike[str] | dict[str, Any],
    start: dt.date | str,
    end: dt.date | str,
    *,
    overrides: dict[str, Any] | None = None,
    progress: bool = False,
    on_date: Callable[[dt.date, str, RunRecord | None], None] | None = None,
) -> BackfillResult:
    """Run every scheduled date from `start` to `end` (inclusive), oldest first, in this
    process; a date whose output holds `_SUCCESS` is skipped, an incomplete one resumed.

    Stops at the first date that fails (its exception propagates; `on_date` has been told
    about the dates before it). `on_date(date, "skipped" | "ran", summary)` reports progress.
    """
    first, last = parse_date(start, "--from"), parse_date(end, "--to")
    if first > last:
        raise UserError(f"--from {first} is after --to {last}")
    schedule = resolve_spec(source, overrides, first).schedule
    dates = scheduled_dates(schedule, first, last)
    specs = [(d, resolve_spec(source, overrides, d)) for d in dates]
    seen: dict[str, dt.date] = {}
    for day, spec in specs:
        if spec.output.path in seen:
            raise SpecError(
                f"output.path: {seen[spec.output.path]} and {day} both write to "
                f"{spec.output.path}; put {{date}} in output.path so each date has its own output"
            )
        seen[spec.output.path] = day
    result = BackfillResult()
    for day, spec in specs:
        if open_location(spec.output.path, "output.path", OutputError).exists(SUCCESS):
            result.skipped.append(day)
            if on_date:
                on_date(day, "skipped", None)
            continue
        from batch_infer.job import run  # Ray loads only when a date runs

        summary = run(spec, progress=progress)
        result.ran.append((day, summary))
        if on_date:
            on_date(day, "ran", summary)
    return result


# --------------------------------------------------------------------------- command line


def _parse_after(text: str, schedule: ScheduleSpec) -> dt.datetime:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"--after {text!r}: expected YYYY-MM-DD or YYYY-MM-DDTHH:MM") from None
    return when.replace(tzinfo=schedule.tz) if when.tzinfo is None else when


def _cmd_schedule(args: argparse.Namespace) -> int:
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    overrides = parse_overrides(args.set)
    spec = resolve_spec(args.spec, overrides)
    schedule = _schedule_of(spec)
    if args.next is not None:
        if args.next < 1:
            raise UserError(f"--next {args.next}: expected a count of 1 or more")
        after = _parse_after(args.after, schedule) if args.after else None
        err.print(f"next {args.next} run(s) of {spec.name}: {schedule.cron} in {schedule.timezone}")
        for when in next_runs(schedule, args.next, after):
            print(when.isoformat())
        return 0
    spec_path = str(Path(args.spec).absolute())
    caveat = dst_caveat(schedule)
    if caveat:
        err.print(f"warning: {caveat}")
    if args.emit in ("cron", "systemd"):
        emit = emit_cron if args.emit == "cron" else emit_systemd
        emitted = emit(spec, spec_path, args.set, args.address, os.getcwd())
    else:
        if args.address:
            raise UserError(
                f"--address does not apply to --emit {args.emit}: each run's RayJob brings "
                "its own Ray cluster"
            )
        if not args.image:
            raise UserError(f"--emit {args.emit} needs --image (built from cluster/Dockerfile)")
        if args.workers < 1 or args.gpus_per_worker < 1:
            raise UserError("--workers and --gpus-per-worker must be 1 or more")
        paths = {"input.path": spec.input.path, "output.path": spec.output.path}
        paths["model.onnx"] = spec.model.onnx
        local = [key for key, path in paths.items() if not is_uri(path)]
        if local:
            err.print(
                f"warning: local path(s) in {', '.join(local)}: the Ray pods must see them at "
                "the same place (a shared volume), or use s3://, gs://, ..."
            )
        opts = KubeOptions(
            image=args.image,
            workers=args.workers,
            gpus_per_worker=args.gpus_per_worker,
            ray_version=args.ray_version or _ray_version(),
            kubectl_image=args.kubectl_image,
        )
        text = Path(args.spec).read_text()
        emit = emit_kubernetes if args.emit == "kubernetes" else emit_raycronjob
        emitted = emit(spec, text, args.set, opts)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, body in emitted.files.items():
            (out / name).write_text(body)
            err.print(f"wrote {out / name}")
    else:
        sys.stdout.write(emitted.text())
    return 0


def _cmd_backfill(args: argparse.Namespace) -> int:
    err = Console(stderr=True, highlight=False, soft_wrap=True)

    def report(day: dt.date, what: str, summary: RunRecord | None) -> None:
        if summary is None:
            err.print(f"{day}: skipped, already complete")
        else:
            err.print(
                f"{day}: {summary.status}, {summary.rows_this_run:,} rows in "
                f"{summary.seconds:.1f} s -> {summary.output}"
            )

    result = backfill(
        args.spec,
        args.start,
        args.end,
        overrides=parse_overrides(args.set),
        progress=not args.quiet,
        on_date=report,
    )
    err.print(f"backfill: {len(result.ran)} date(s) run, {len(result.skipped)} already complete")
    return 0


def register(subparsers: Any) -> None:
    """Add the `schedule` and `backfill` subcommands to batch-infer's command line."""
    s = subparsers.add_parser(
        "schedule",
        help="write cron / systemd / Kubernetes definitions for a scheduled spec, or print "
        "its next run times",
        description="Needs a spec with schedule: {cron: ..., timezone: ...}. Writes to stdout "
        "unless --out DIR is given.",
    )
    s.add_argument("spec", help="the job spec (YAML) with a schedule")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--emit", choices=EMITTERS, help="what to write")
    what.add_argument("--next", type=int, metavar="N", help="print the next N run times")
    s.add_argument(
        "--after",
        metavar="YYYY-MM-DD[THH:MM]",
        help="with --next: count from this time in the schedule's time zone (default: now)",
    )
    s.add_argument("--out", metavar="DIR", help="write the files into DIR instead of stdout")
    add_spec_arguments(s)  # the overrides are passed on to every scheduled run
    s.add_argument(
        "--address",
        help="cron/systemd: the Ray cluster each run joins (RAY_ADDRESS, e.g. head-node:6379); "
        "default: a local Ray started by the run",
    )
    s.add_argument("--image", help="kubernetes/raycronjob: the image built from cluster/Dockerfile")
    s.add_argument(
        "--kubectl-image",
        help="kubernetes: image with bash and kubectl for the CronJob's pod (default: --image)",
    )
    s.add_argument("--workers", type=int, default=1, help="kubernetes: GPU worker pods per run")
    s.add_argument("--gpus-per-worker", type=int, default=1, help="kubernetes: GPUs per worker pod")
    s.add_argument(
        "--ray-version",
        help="kubernetes: rayVersion (the image's Ray; default: the Ray installed here)",
    )
    s.set_defaults(func=_cmd_schedule)

    b = subparsers.add_parser(
        "backfill",
        help="run every scheduled date from D1 to D2, oldest first, skipping complete ones",
    )
    b.add_argument("spec", help="the job spec (YAML); output.path must use {date}")
    b.add_argument("--from", dest="start", required=True, metavar="YYYY-MM-DD")
    b.add_argument("--to", dest="end", required=True, metavar="YYYY-MM-DD")
    add_spec_arguments(b)
    b.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    b.set_defaults(func=_cmd_backfill)
