"""Schedules: {date} templating, next run times, crontab / systemd / Kubernetes emission, and
backfill over real runs of the quickstart model."""

from __future__ import annotations

import argparse
import datetime as dt
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import zoneinfo
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml
from croniter import croniter

import batch_infer
from batch_infer import cli
from batch_infer.errors import SpecError, UserError
from batch_infer.ops import schedule as scheduling
from batch_infer.ops.schedule import oncalendar, scheduled_dates
from batch_infer.spec import ScheduleSpec, parse_date, resolve_spec
from tests.conftest import ROOT, read_output, run_records

BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def schedule_cli(argv: list[str]) -> int:
    """`batch-infer schedule|backfill ...` through the subcommands scheduling registers."""
    parser = argparse.ArgumentParser(prog="batch-infer")
    scheduling.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def dated_spec(**extra) -> dict:
    spec = {
        "name": "nightly",
        "schedule": {"cron": "0 2 * * *", "timezone": "Europe/Berlin"},
        "input": {"path": "in/{date:%Y/%m/%d}/"},
        "model": {"onnx": "models/{date:%Y}/m.onnx", "inputs": {"x": "x"}},
        "output": {"path": "out/date={date}/"},
    }
    spec.update(extra)
    return spec


# ----------------------------------------------------------------------------- {date}


def test_date_placeholders_are_filled_in(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = resolve_spec(dated_spec(), date=dt.date(2026, 3, 5))
    assert spec.input.path == str(tmp_path / "in/2026/03/05")
    assert spec.model.onnx == str(tmp_path / "models/2026/m.onnx")
    assert spec.output.path == str(tmp_path / "out/date=2026-03-05")
    assert spec.date == "2026-03-05"
    # literal braces, %j, a string date, and URIs (not resolved)
    doc = dated_spec(output={"path": "s3://b/{{x}}/{date:%Y-%j}"})
    spec = resolve_spec(doc, date=parse_date("2026-02-01"))
    assert spec.output.path == "s3://b/{x}/2026-032"


def test_default_date_is_today_in_the_schedules_zone(tmp_path):
    for zone in ("Pacific/Kiritimati", "Pacific/Pago_Pago"):  # UTC+14 and UTC-11
        before = dt.datetime.now(zoneinfo.ZoneInfo(zone)).date()
        spec = resolve_spec(dated_spec(schedule={"cron": "0 2 * * *", "timezone": zone}))
        after = dt.datetime.now(zoneinfo.ZoneInfo(zone)).date()
        assert spec.date in (before.isoformat(), after.isoformat())
        assert spec.output.path.endswith(f"date={spec.date}")
    no_schedule = dated_spec()
    del no_schedule["schedule"]
    spec = resolve_spec(no_schedule)
    assert spec.date == dt.datetime.now(dt.timezone.utc).date().isoformat()


def test_a_spec_without_date_is_unaffected(tmp_path):
    doc = {
        "name": "plain",
        "input": {"path": str(tmp_path / "in")},
        "model": {"onnx": str(tmp_path / "m.onnx"), "inputs": {"x": "x"}},
        "output": {"path": str(tmp_path / "out")},
    }
    spec = resolve_spec(doc)
    assert (spec.input.path, spec.output.path, spec.date) == (
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        None,
    )
    assert resolve_spec(doc, date=dt.date(2026, 1, 2)).date == "2026-01-02"  # asked for


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("output", {"path": "out/{day}/"}, r"output\.path: .*unknown placeholder \{day\}"),
        ("input", {"path": "in/{date.year}/"}, r"input\.path: .*unknown placeholder"),
        ("output", {"path": "out/{date!r}/"}, r"output\.path: .*unknown placeholder \{date!r\}"),
        ("output", {"path": "out/{date:%Q}/"}, r"output\.path: .*%Q is not a strftime"),
        ("output", {"path": "out/{date:%Y%}/"}, r"output\.path: .*lone %"),
        ("output", {"path": "out/{date:year}/"}, r"output\.path: .*no strftime directive"),
        ("input", {"path": "in/{date"}, r"input\.path: .*(expected '\}'|unmatched)"),
        ("input", {"path": "in/}"}, r"input\.path: .*Single '\}'"),
    ],
)
def test_bad_placeholders_name_the_key(key, value, message):
    with pytest.raises(SpecError, match=message):
        resolve_spec(dated_spec(**{key: value}), date=dt.date(2026, 1, 1))


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"cron": "61 2 * * *"}, r"schedule\.cron.*not a valid cron"),
        ({"cron": "0 2 * * * 2030"}, r"schedule\.cron.*expected 5 fields"),
        ({"cron": "0 2 L * *"}, r"schedule\.cron.*'L' is not portable"),
        ({"cron": "0 2 * * 5#2"}, r"schedule\.cron.*not portable"),
        ({"cron": "@reboot"}, r"schedule\.cron.*unknown macro"),
        ({"cron": "0 2 */2 * 1"}, r"schedule\.cron.*ambiguous"),
        # croniter takes these; Kubernetes (robfig/cron) and cron refuse them
        ({"cron": "0 2 * * 7"}, r"schedule\.cron.*'7': 7 for Sunday is not portable"),
        ({"cron": "0 2 * * 5-7"}, r"schedule\.cron.*7 for Sunday is not portable"),
        ({"cron": "0 22-2 * * *"}, r"schedule\.cron.*hour field '22-2'.* runs backwards"),
        ({"cron": "0 2 * * fri-mon"}, r"schedule\.cron.*'fri-mon' runs backwards"),
        ({"cron": "0 0 1 nov-feb *"}, r"schedule\.cron.*month field .* runs backwards"),
        ({"cron": "0 0 30 2 *"}, r"schedule\.cron.*never matches a date"),
        ({"cron": "0 2 * * *", "timezone": "Mars/Olympus"}, r"schedule\.timezone.*unknown"),
        ({"cron": "0 2 * * *", "every": 1}, r"schedule\.every.*unknown key"),
    ],
)
def test_bad_schedules_are_spec_errors(schedule, message):
    with pytest.raises(SpecError, match=message):
        resolve_spec(dated_spec(schedule=schedule))


def test_date_is_not_a_spec_key_and_bad_dates_are_refused():
    with pytest.raises(SpecError, match="key 'date'"):
        resolve_spec(dated_spec(date="2026-01-01"))
    with pytest.raises(SpecError, match="--date '2026-13-01': expected a date as YYYY-MM-DD"):
        parse_date("2026-13-01")
    assert ScheduleSpec(cron=" @DAILY ").cron == "@daily"
    assert ScheduleSpec(cron="0  2 * jan,JUL mon-fri").cron == "0 2 * jan,JUL mon-fri"


# ----------------------------------------------------------------------------- --next


def write_spec(path: Path, doc: dict) -> Path:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def test_next_prints_the_next_run_times(tmp_path, capsys):
    spec = write_spec(tmp_path / "job.yaml", dated_spec())
    assert schedule_cli(["schedule", str(spec), "--next", "3", "--after", "2026-06-10T12:00"]) == 0
    assert capsys.readouterr().out.split() == [
        "2026-06-11T02:00:00+02:00",
        "2026-06-12T02:00:00+02:00",
        "2026-06-13T02:00:00+02:00",
    ]
    # across the end of summer time: 02:00 on 25 October happens twice (CEST, then CET);
    # it runs once, at the first, like cron
    assert schedule_cli(["schedule", str(spec), "--next", "3", "--after", "2026-10-24"]) == 0
    assert capsys.readouterr().out.split() == [
        "2026-10-24T02:00:00+02:00",
        "2026-10-25T02:00:00+02:00",
        "2026-10-26T02:00:00+01:00",
    ]
    # default: from now
    assert schedule_cli(["schedule", str(spec), "--next", "1"]) == 0
    first = dt.datetime.fromisoformat(capsys.readouterr().out.strip())
    now = dt.datetime.now(BERLIN)
    assert now < first <= now + dt.timedelta(days=1)
    assert first.astimezone(BERLIN).hour == 2


def test_next_as_json_gives_times_and_logical_dates(tmp_path, capsys):
    spec = write_spec(tmp_path / "job.yaml", dated_spec())
    args = ["schedule", str(spec), "--next", "2", "--after", "2026-10-24T03:00", "--json"]
    assert schedule_cli(args) == 0
    out = capsys.readouterr()
    assert json.loads(out.out) == [
        {"time": "2026-10-25T02:00:00+02:00", "date": "2026-10-25"},
        {"time": "2026-10-26T02:00:00+01:00", "date": "2026-10-26"},
    ]
    assert out.err == ""  # nothing but the JSON, for scripts


def test_schedule_needs_a_schedule(tmp_path):
    doc = dated_spec()
    del doc["schedule"]
    spec = write_spec(tmp_path / "job.yaml", doc)
    with pytest.raises(SpecError, match="has no schedule"):
        schedule_cli(["schedule", str(spec), "--next", "1"])


# ----------------------------------------------------------------------------- cron


def test_crontab_line_runs_at_the_schedules_times(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    doc = dated_spec(schedule={"cron": "30 6 * * 1-5", "timezone": "America/New_York"})
    spec = write_spec(tmp_path / "job.yaml", doc)
    args = ["schedule", str(spec), "--emit", "cron", "--address", "head:6379"]
    assert schedule_cli([*args, "--set", "output.path=out/{date:%Y%m%d}", "--out", "cron"]) == 0
    lines = [
        ln
        for ln in (tmp_path / "cron/batch-infer-nightly.crontab").read_text().splitlines()
        if ln and not ln.startswith("#")
    ]
    assert lines[0] == "CRON_TZ=America/New_York"
    fields = lines[1].split(" ", 5)
    tz = zoneinfo.ZoneInfo(lines[0].split("=", 1)[1])
    times = croniter(" ".join(fields[:5]), dt.datetime(2026, 6, 12, 12, 0, tzinfo=tz))  # a Friday
    assert [times.get_next(dt.datetime).isoformat() for _ in range(3)] == [
        "2026-06-15T06:30:00-04:00",
        "2026-06-16T06:30:00-04:00",
        "2026-06-17T06:30:00-04:00",
    ]
    command = fields[5]
    assert command.startswith(f"cd {tmp_path} && RAY_ADDRESS=head:6379 ")
    assert "%" not in command.replace("\\%", "")  # cron would cut the line at a bare %
    argv = shlex.split(command.split(" && ", 1)[1].replace("\\%", "%"))[1:]
    assert argv[argv.index("run") :] == [
        "run", "-q", str(spec), "--set", "output.path=out/{date:%Y%m%d}",
    ]  # fmt: skip


# ----------------------------------------------------------------------------- systemd

CRONS = [
    ("0 2 * * *", "Europe/Berlin"),
    ("*/15 9-17 * * 1-5", "Europe/Berlin"),
    ("30 6 1,15 * *", "America/New_York"),
    ("0 12 * jan,jun sun", "UTC"),
    ("5 4 13 * 5", "Asia/Tokyo"),  # day 13 *or* a Friday: two OnCalendar= lines
    ("0 */6 * * 6,0", "UTC"),
    ("@weekly", "Australia/Sydney"),
]
BASE = dt.datetime(2026, 6, 11, 12, 0, tzinfo=dt.timezone.utc)  # far from DST changes


def croniter_times(cron: str, zone: str, count: int) -> list[dt.datetime]:
    it = croniter(cron, BASE.astimezone(zoneinfo.ZoneInfo(zone)))
    return [it.get_next(dt.datetime).astimezone(dt.timezone.utc) for _ in range(count)]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
@pytest.mark.parametrize(("cron", "zone"), CRONS)
def test_oncalendar_matches_cron_per_systemd_analyze(cron, zone):
    count = 12
    expressions = oncalendar(ScheduleSpec(cron=cron, timezone=zone))
    out = subprocess.run(
        [
            "systemd-analyze",
            "calendar",
            f"--iterations={count}",
            f"--base-time=@{int(BASE.timestamp())}",
            *expressions,
        ],
        env={"TZ": "UTC", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.count("Normalized form:") == len(expressions)
    found = re.findall(r"(?:Next elapse|Iter\. #\d+): \w+ (\S+ \S+) UTC", out)
    times = sorted({dt.datetime.fromisoformat(t).replace(tzinfo=dt.timezone.utc) for t in found})[
        :count
    ]
    assert times == croniter_times(cron, zone, count)


def _calendar_values(text: str, names: list[str] | None = None) -> set[int]:
    """An independent reading of one OnCalendar component: lists, a..b ranges, a/step."""
    values: set[int] = set()
    for part in text.split(","):
        if "/" in part:
            start, step = part.split("/")
            values.update(range(int(start), 60, int(step)))
        elif ".." in part:
            a, b = part.split("..")
            lo, hi = (names.index(a), names.index(b)) if names else (int(a), int(b))
            values.update(range(lo, hi + 1))
        else:
            values.add(names.index(part) if names else int(part))
    return values


def calendar_matches(expression: str, when: dt.datetime) -> bool:
    """Whether `when` (a local time in the expression's zone) matches an OnCalendar= line."""
    m = re.fullmatch(r"(?:(\S+) )?\*-(\S+)-(\S+) (\S+):(\S+):00 \S+", expression)
    assert m, expression
    days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    dow, month, dom, hour, minute = m.groups()

    def ok(text: str | None, value: int, names: list[str] | None = None) -> bool:
        return text in (None, "*") or value in _calendar_values(text, names)

    return (
        ok(dow, when.weekday(), days)
        and ok(month, when.month)
        and ok(dom, when.day)
        and ok(hour, when.hour)
        and ok(minute, when.minute)
    )


@pytest.mark.parametrize(("cron", "zone"), CRONS)
def test_oncalendar_matches_cron_minute_by_minute(cron, zone):
    """Without systemd: read the OnCalendar= lines with a small parser of their own and
    compare every minute of 16 days with croniter."""
    tz = zoneinfo.ZoneInfo(zone)
    expressions = oncalendar(ScheduleSpec(cron=cron, timezone=zone))
    start = BASE.astimezone(tz).replace(second=0, microsecond=0)
    minutes = [start + dt.timedelta(minutes=i + 1) for i in range(16 * 24 * 60)]
    ours = [t for t in minutes if any(calendar_matches(e, t) for e in expressions)]
    it = croniter(cron, start)
    theirs = []
    while (t := it.get_next(dt.datetime)) <= minutes[-1]:
        theirs.append(t)
    assert ours == theirs and theirs


def test_systemd_units(tmp_path, monkeypatch):
    tmp_path = tmp_path / "my dir%x"  # a space and a specifier character: in paths, both
    tmp_path.mkdir()
    monkeypatch.chdir(tmp_path)
    spec = write_spec(tmp_path / "my job.yaml", dated_spec())
    args = ["schedule", str(spec), "--emit", "systemd", "--address", "ray://head:10001"]
    assert schedule_cli([*args, "--out", "units"]) == 0
    service = (tmp_path / "units/batch-infer-nightly.service").read_text()
    timer = (tmp_path / "units/batch-infer-nightly.timer").read_text()
    assert "OnCalendar=*-*-* 02:00:00 Europe/Berlin\n" in timer
    assert "Unit=batch-infer-nightly.service\n" in timer
    assert "Type=oneshot\n" in service
    assert f"WorkingDirectory={str(tmp_path).replace('%', '%%')}\n" in service
    assert 'Environment="RAY_ADDRESS=ray://head:10001"\n' not in service  # no quoting needed
    assert "Environment=RAY_ADDRESS=ray://head:10001\n" in service
    assert f'run -q "{str(spec).replace("%", "%%")}"\n' in service
    if shutil.which("systemd-analyze"):  # systemd's own parser of both units
        units = ["batch-infer-nightly.timer", "batch-infer-nightly.service"]
        subprocess.run(
            ["systemd-analyze", "verify", *units],
            cwd=tmp_path / "units",
            check=True,
            capture_output=True,
        )


# ----------------------------------------------------------------------------- Kubernetes


def k8s_docs(text: str) -> dict[str, dict]:
    return {d["kind"]: d for d in yaml.safe_load_all(text)}


def check_rayjob_spec(job: dict, image: str, gpus: int, spec_file: str) -> None:
    assert job["entrypoint"].startswith(f"batch-infer run -q {spec_file}")
    assert job["shutdownAfterJobFinishes"] is True
    assert job["ttlSecondsAfterFinished"] > 0
    assert job["activeDeadlineSeconds"] > 0  # a hung run is ended
    cluster = job["rayClusterSpec"]
    assert cluster["authOptions"] == {"mode": "token"}
    assert tuple(int(x) for x in cluster["rayVersion"].split(".")[:2]) >= (2, 52)
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["containers"][0]["image"] == image
    assert "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
    mount = head["containers"][0]["volumeMounts"][0]["mountPath"]
    assert spec_file.startswith(mount + "/")
    [worker] = cluster["workerGroupSpecs"]
    assert worker["minReplicas"] == worker["replicas"] == worker["maxReplicas"] >= 1
    [container] = worker["template"]["spec"]["containers"]
    assert container["image"] == image
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)


def test_kubernetes_cronjob_wraps_a_rayjob(tmp_path, capsys):
    spec = write_spec(tmp_path / "job.yaml", dated_spec())
    image = "registry.example/batch-infer:1.2"
    args = ["schedule", str(spec), "--emit", "kubernetes", "--image", image, "--set", "slots=4"]
    assert schedule_cli([*args, "--gpus-per-worker", "4", "--workers", "3", "--deadline", "6"]) == 0
    out = capsys.readouterr()
    assert "local path(s) in input.path, output.path, model.onnx" in out.err
    docs = k8s_docs(out.out)
    cron = docs["CronJob"]
    assert cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["schedule"] == "0 2 * * *"
    assert cron["spec"]["timeZone"] == "Europe/Berlin"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    pod = job["template"]["spec"]
    [submit] = pod["containers"]
    assert submit["image"] == scheduling.KUBECTL_IMAGE  # not the TensorRT image: kubectl only
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    [rayjobs, *_] = docs["Role"]["rules"]
    assert rayjobs == {
        "apiGroups": ["ray.io"],
        "resources": ["rayjobs"],
        "verbs": ["create", "get", "list", "delete"],
    }
    config = docs["ConfigMap"]
    assert pod["volumes"][0]["configMap"]["name"] == config["metadata"]["name"]
    assert config["data"]["job.yaml"] == spec.read_text()
    script = config["data"]["submit.sh"]
    assert submit["command"] == ["/bin/sh", "/etc/batch-infer/submit.sh"]
    assert "kubectl create -f" in script and 'kubectl delete rayjob "$job"' in script
    subprocess.run(["sh", "-n", "-c", script], check=True)  # the script parses
    rayjob = yaml.safe_load(config["data"]["rayjob.yaml"])
    assert (rayjob["apiVersion"], rayjob["kind"]) == ("ray.io/v1", "RayJob")
    assert rayjob["metadata"]["generateName"] == "nightly-"
    check_rayjob_spec(rayjob["spec"], image, 4, "/etc/batch-infer/job.yaml")
    assert rayjob["spec"]["entrypoint"].endswith("--set slots=4")
    assert rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 3
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert head["volumes"][0]["configMap"]["name"] == config["metadata"]["name"]
    # a hung run ends: the RayJob after --deadline, the pod (which then deletes it) a bit later
    assert rayjob["spec"]["activeDeadlineSeconds"] == 6 * 3600
    assert 6 * 3600 < job["activeDeadlineSeconds"] <= 7 * 3600

    small = ["--kubectl-image", "registry.example/kubectl:1.33"]
    assert schedule_cli([*args, *small]) == 0
    pod = k8s_docs(capsys.readouterr().out)["CronJob"]["spec"]["jobTemplate"]["spec"]["template"]
    assert pod["spec"]["containers"][0]["image"] == "registry.example/kubectl:1.33"


KUBECTL_STUB = """#!/bin/sh
# kubectl as the submit script sees it, answering from the environment; calls are logged
echo "$*" >> "$STUB_LOG"
case "$*" in
  "create -f"*) echo nightly-x7k2p ;;
  "get rayjob -l"*) printf '%s' "$STUB_OLD" ;;
  *"{.status.message}"*) printf '%s' "$STUB_MESSAGE" ;;
  "get rayjob"*) printf '%s' "$STUB_STATE" ;;
  "logs job/nightly-x7k2p"*) echo "batch-infer run nightly: ..." ;;
esac
"""


def run_submit_script(tmp_path: Path, state: str, message: str = "", **popen) -> subprocess.Popen:
    """The CronJob pod's script (templates/submit.sh), with `kubectl` answered by a stub:
    there is no Kubernetes here, the script's decisions are what is tested."""
    (tmp_path / "bin").mkdir(exist_ok=True)
    stub = tmp_path / "bin" / "kubectl"
    stub.write_text(KUBECTL_STUB)
    stub.chmod(0o755)
    script = tmp_path / "submit.sh"
    script.write_text(scheduling.template("submit.sh"))
    env = {
        "PATH": f"{tmp_path / 'bin'}:/usr/bin:/bin",
        "BATCH_INFER_JOB": "nightly",
        "POLL_SECONDS": "1",
        "STUB_LOG": str(tmp_path / "calls"),
        "STUB_OLD": "nightly-old1=Complete nightly-old2=Running nightly-old3=Failed ",
        "STUB_STATE": state,
        "STUB_MESSAGE": message,
    }
    return subprocess.Popen(["sh", str(script)], env=env, text=True, **popen)


@pytest.mark.parametrize(
    ("state", "message", "code"),
    [
        ("Complete/SUCCEEDED/", "Job finished successfully.", 0),
        ("Failed/FAILED/AppFailed", "Job entrypoint command failed with exit code 3, last ...", 3),
        ("Failed/FAILED/AppFailed", "Job entrypoint command failed with exit code 2", 2),
        ("Failed/RUNNING/DeadlineExceeded", "The RayJob has passed its deadline.", 124),
        ("Failed/FAILED/DeadlineExceeded", "failed with exit code -15", 124),
        ("Failed//SubmissionFailed", "", 5),
        ("Complete/STOPPED/", "Job was intentionally stopped.", 5),
    ],
)
def test_cronjob_pod_exits_with_the_runs_code_and_deletes_its_rayjob(
    tmp_path, state, message, code
):
    proc = run_submit_script(tmp_path, state, message, stdout=subprocess.PIPE)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == code, out
    calls = (tmp_path / "calls").read_text().splitlines()
    deleted = [c.split()[2] for c in calls if c.startswith("delete rayjob")]
    # finished leftovers of killed pods, then its own RayJob; never a running one
    assert deleted == ["nightly-old1", "nightly-old3", "nightly-x7k2p"]
    assert "batch-infer run nightly" in out  # the run's log, from KubeRay's submitter Job


def test_cronjob_pod_ended_by_its_deadline_deletes_its_rayjob(tmp_path):
    proc = run_submit_script(tmp_path, "Running/RUNNING/", stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "created rayjob/nightly-x7k2p"
    proc.terminate()  # what Kubernetes does at the Job's activeDeadlineSeconds
    proc.communicate(timeout=60)
    assert proc.returncode == 143
    assert "delete rayjob nightly-x7k2p --wait=false" in (tmp_path / "calls").read_text()


def test_raycronjob_variant(tmp_path, capsys):
    spec = write_spec(tmp_path / "job.yaml", dated_spec())
    args = ["schedule", str(spec), "--emit", "raycronjob", "--image", "img:1"]
    assert schedule_cli(args) == 0
    docs = k8s_docs(capsys.readouterr().out)
    cron = docs["RayCronJob"]
    assert (cron["apiVersion"], cron["spec"]["schedule"]) == ("ray.io/v1", "0 2 * * *")
    assert cron["spec"]["timeZone"] == "Europe/Berlin"
    check_rayjob_spec(cron["spec"]["jobTemplate"], "img:1", 1, "/etc/batch-infer/job.yaml")
    assert cron["spec"]["jobTemplate"]["activeDeadlineSeconds"] == 24 * 3600  # the default
    assert len(cron["metadata"]["name"]) <= 36  # KubeRay's limit for RayCronJob names


def test_kubernetes_emission_refuses_what_does_not_apply(tmp_path):
    spec = write_spec(tmp_path / "job.yaml", dated_spec())
    with pytest.raises(UserError, match="needs --image"):
        schedule_cli(["schedule", str(spec), "--emit", "kubernetes"])
    with pytest.raises(UserError, match="--deadline > 0"):
        schedule_cli(
            ["schedule", str(spec), "--emit", "kubernetes", "--image", "i", "--deadline", "0"]
        )
    with pytest.raises(UserError, match="--address does not apply"):
        schedule_cli(
            ["schedule", str(spec), "--emit", "raycronjob", "--image", "i", "--address", "h:1"]
        )


@pytest.mark.parametrize("name", ["cronjob.yaml", "raycronjob.yaml"])
def test_checked_in_manifests_are_what_the_emitter_writes(name, capsys, monkeypatch):
    """cluster/kuberay/{cronjob,raycronjob}.yaml start with the command that made them."""
    monkeypatch.chdir(ROOT)
    text = (ROOT / "cluster/kuberay" / name).read_text()
    first, rest = text.split("\n", 1)
    command = shlex.split(first.removeprefix("# Generated by: "))
    assert command[:2] == ["batch-infer", "schedule"]
    assert schedule_cli(command[1:]) == 0
    assert capsys.readouterr().out == rest, f"regenerate {name} with: {first[16:]}"


# ----------------------------------------------------------------------------- backfill


def test_scheduled_dates_follow_the_schedule():
    weekly = ScheduleSpec(cron="0 3 * * 1", timezone="Europe/Berlin")  # Mondays
    assert scheduled_dates(weekly, dt.date(2026, 6, 1), dt.date(2026, 6, 21)) == [
        dt.date(2026, 6, 1),
        dt.date(2026, 6, 8),
        dt.date(2026, 6, 15),
    ]
    hourly = ScheduleSpec(cron="@hourly")
    assert scheduled_dates(hourly, dt.date(2026, 6, 1), dt.date(2026, 6, 2)) == [
        dt.date(2026, 6, 1),
        dt.date(2026, 6, 2),
    ]
    assert len(scheduled_dates(None, dt.date(2026, 2, 27), dt.date(2026, 3, 2))) == 4


def test_backfill_refuses_outputs_without_date(tmp_path):
    doc = dated_spec(output={"path": str(tmp_path / "out")})
    with pytest.raises(SpecError, match=r"output\.path: 2026-06-01 and 2026-06-02 both write"):
        scheduling.backfill(doc, "2026-06-01", "2026-06-02")
    with pytest.raises(UserError, match="after --to"):
        scheduling.backfill(dated_spec(), "2026-06-02", "2026-06-01")


DATES = ["2026-11-01", "2026-11-02", "2026-11-03"]


@pytest.fixture
def daily_digits(tmp_path) -> Path:
    """A daily spec over per-date Parquet folders of the quickstart digits (60 rows a day)."""
    table = ds.dataset(str(ROOT / "data/digits"), format="parquet", partitioning="hive")
    table = table.to_table(columns=["id", "pixels", "label"])
    for i, day in enumerate(DATES):
        folder = tmp_path / "in" / f"date={day}"
        folder.mkdir(parents=True)
        pq.write_table(table.slice(60 * i, 60), folder / "part-0.parquet")
    return write_spec(
        tmp_path / "daily.yaml",
        {
            "name": "digits-daily",
            "schedule": {"cron": "15 1 * * *", "timezone": "UTC"},
            "input": {"path": str(tmp_path / "in/date={date}/")},
            "model": {
                "onnx": str(ROOT / "models/digits.onnx"),
                "inputs": {"pixels": "pixels"},
                "outputs": {"predicted": "predicted"},
            },
            "device": "cpu",
            "num_actors": 1,
            "output": {"path": str(tmp_path / "out/date={date}/"), "keep_columns": ["id"]},
        },
    )


def test_backfill_runs_missing_dates_in_order(ray_start_regular, daily_digits, tmp_path):
    # One date is already complete: run with the CLI, as a scheduled run or a rerun would.
    assert cli.main(["run", str(daily_digits), "--date", DATES[1], "-q"]) == 0
    [first_run] = (tmp_path / f"out/date={DATES[1]}/_runs").glob("*.json")
    assert json.loads(first_run.read_text())["date"] == DATES[1]

    seen = []
    result = scheduling.backfill(
        daily_digits, DATES[0], DATES[2], on_date=lambda d, what, s: seen.append((str(d), what))
    )
    assert seen == [(DATES[0], "ran"), (DATES[1], "skipped"), (DATES[2], "ran")]
    assert [str(d) for d in result.skipped] == [DATES[1]]
    assert [(str(d), s.date, s.status) for d, s in result.ran] == [
        (DATES[0], DATES[0], "succeeded"),
        (DATES[2], DATES[2], "succeeded"),
    ]
    for day in DATES:
        out = tmp_path / f"out/date={day}"
        assert (out / "_SUCCESS").exists()
        ids = read_output(out).column("id").to_pylist()
        inputs = pq.read_table(tmp_path / f"in/date={day}/part-0.parquet").column("id")
        assert sorted(ids) == sorted(inputs.to_pylist()) and len(ids) == 60
        runs = run_records(out)
        assert [r["date"] for r in runs] == [day]  # one run each: nothing ran twice

    # Everything complete: a second backfill (the CLI this time) runs nothing.
    again = ["backfill", str(daily_digits), "--from", DATES[0], "--to", DATES[2], "-q"]
    assert schedule_cli(again) == 0
    assert all(len(list((tmp_path / f"out/date={d}/_runs").glob("*.json"))) == 1 for d in DATES)

    # Rerunning a date through the Python API with date= resumes it: nothing left to do.
    summary = batch_infer.run(str(daily_digits), date=dt.date(2026, 11, 3))
    assert (summary.date, summary.shards_committed, summary.status) == (DATES[2], 0, "succeeded")
    assert resolve_spec(daily_digits, date=dt.date(2026, 11, 3)).output.path == str(
        tmp_path / "out/date=2026-11-03"
    )


def test_backfill_dry_run_and_continue_on_error(ray_start_regular, daily_digits, tmp_path, capsys):
    assert cli.main(["run", str(daily_digits), "--date", DATES[0], "-q"]) == 0
    shutil.rmtree(tmp_path / f"in/date={DATES[1]}")  # this date's input never arrived
    args = ["backfill", str(daily_digits), "--from", DATES[0], "--to", DATES[2], "-q"]

    assert schedule_cli([*args, "--dry-run"]) == 0
    out = capsys.readouterr()
    assert [line.split()[:2] for line in out.out.splitlines()] == [
        [DATES[0], "skip"],
        [DATES[1], "run"],
        [DATES[2], "run"],
    ]
    assert "backfill --dry-run: 2 to run, 1 to skip" in out.err
    assert not (tmp_path / f"out/date={DATES[2]}").exists()  # nothing ran

    assert schedule_cli([*args, "--continue-on-error"]) == 2  # the failed date's exit code
    err = capsys.readouterr().err
    assert f"{DATES[1]}: failed: " in err and f"{DATES[2]}: succeeded" in err
    assert err.rstrip().endswith("backfill: 1 succeeded, 1 failed, 1 skipped")
    assert (tmp_path / f"out/date={DATES[2]}/_SUCCESS").exists()  # ran after the failure
    assert not (tmp_path / f"out/date={DATES[1]}/_SUCCESS").exists()


def test_schedule_and_backfill_dry_run_do_not_load_ray(daily_digits):
    """Ray takes seconds to import: only a backfill that runs a date loads it."""
    code = (
        "import argparse, sys\n"
        "from batch_infer.ops import schedule\n"
        "parser = argparse.ArgumentParser()\n"
        "schedule.register(parser.add_subparsers(dest='command'))\n"
        "for argv in sys.argv[1:]:\n"
        "    args = parser.parse_args(argv.split())\n"
        "    assert args.func(args) == 0\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    backfill = f"backfill {daily_digits} --from {DATES[0]} --to {DATES[2]} --dry-run"
    argv = [f"schedule {daily_digits} --next 3", f"schedule {daily_digits} --emit cron", backfill]
    subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True)


def test_templates_are_package_data():
    """A non-editable install ships what pyproject.toml's package-data names: every
    template must match it (checked against the built wheel in docs/operations.md's way)."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["batch_infer.ops"]
    folder = ROOT / "batch_infer/ops/templates"
    names = sorted(p.relative_to(folder.parent).as_posix() for p in folder.iterdir())
    assert names and all(any(fnmatch.fnmatch(n, pat) for pat in patterns) for n in names)
    assert scheduling.template("submit.sh").startswith("# The pod of batch-infer's CronJob")


def test_schedules_in_the_hours_clocks_change_are_flagged():
    def caveat(cron: str, zone: str) -> str | None:
        return scheduling.dst_caveat(ScheduleSpec(cron=cron, timezone=zone))

    assert "in Europe/Berlin (02:00-02:59): a time skipped" in caveat("30 2 * * *", "Europe/Berlin")
    assert caveat("*/10 * * * *", "America/New_York")
    assert caveat("30 4 * * *", "Europe/Berlin") is None
    assert caveat("30 2 * * *", "UTC") is None and caveat("30 2 * * *", "Asia/Tokyo") is None
    # zones whose clocks change at other hours
    assert "(23:00-23:59)" in caveat("30 23 * * *", "America/Nuuk")
    assert caveat("30 2 * * *", "America/Nuuk") is None
    assert "(00:00-00:59, 23:00-23:59)" in caveat("15 0 * * *", "America/Santiago")


def test_a_reader_gone_early_ends_schedule_and_backfill_quietly(tmp_path):
    """`batch-infer schedule ... | head` and the like: exit 141 (as a shell reports a command
    cut off by SIGPIPE), no traceback, as `query` and `inspect` do."""
    spec = write_spec(tmp_path / "nightly.yaml", dated_spec())
    for args in (
        ("schedule", str(spec), "--next", "3"),
        ("schedule", str(spec), "--next", "3", "--json"),
        ("schedule", str(spec), "--emit", "systemd"),
        ("backfill", str(spec), "--from", "2026-01-01", "--to", "2026-01-03", "--dry-run"),
    ):
        cmd = [sys.executable, "-m", "batch_infer.cli", *args]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path)
        proc.stdout.close()  # the reader is gone before the first line
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 141 and b"Traceback" not in err, (args, err)
