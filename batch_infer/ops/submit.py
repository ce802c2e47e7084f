"""`batch-infer submit` and `batch-infer jobs`: runs on a Ray cluster through Ray Jobs.

The spec is validated here and carried to the cluster with the `batch_infer` package and the
model (docs/operations.md, Submit). The token goes only to a dashboard that asks for one, and
is never printed. Exit codes: 2 for what retrying does not cure (a missing or refused token, an
unknown job, a refused request), 5 for the cluster or the network (no dashboard, HTTP 5xx, a
broken log stream).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import importlib.util
import ipaddress
import json
import logging
import os
import re
import shlex
import shutil
import socket
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

import batch_infer
from batch_infer.errors import ClusterError, SpecError, UserError
from batch_infer.location import is_uri
from batch_infer.ops import drop_stdout, json_rows, note
from batch_infer.settings import check_settings, setting, settings_set_here
from batch_infer.spec import (
    add_spec_arguments,
    load_document,
    parse_date,
    parse_overrides,
    resolve_spec,
    set_dotted,
)

SPEC_NAME = "spec.yaml"  # the carried spec, in the job's working_dir
MODEL_DIR = "model"  # the carried model, in the job's working_dir
FILES_DIR = "files"  # the carried tokenizer and labels files, in the job's working_dir
MODEL_ORIGIN_ENV = "BATCH_INFER_MODEL_ORIGIN"  # the carried model's path where it was submitted
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
PENDING_WHY = " (Ray has not started its driver: it sets up the job's files, or waits for room)"
EXIT_JOB_NOT_SUCCEEDED = 1  # a job that failed without a driver exit code, or was stopped
# Ray's runtime_env reference documents a local working_dir as "at most 100 MiB"
# (https://docs.ray.io/en/latest/ray-core/handling-dependencies.html#api-reference).
CARRY_LIMIT = 100 * 1024**2
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")  # pyarrow.fs
# The one place Ray's SDK gives an HTTP status: RuntimeError("Request failed with status code
# N: BODY.") for any answer but 200 (SubmissionClient._raise_error, dashboard_sdk.py).
_STATUS = re.compile(r"status code (\d{3}): (.*)", re.S)


class NoSuchJob(UserError):
    """The cluster has no job with this ID (a typo, or a job deleted since)."""


def _mib(n: int) -> str:
    return f"{n / 1024**2:,.1f} MiB"


def _too_large(what: str, size: int) -> UserError:
    return UserError(
        f"{what} is {_mib(size)}; a submitted job carries at most {_mib(CARRY_LIMIT)} per "
        "package (Ray's limit for a local working_dir): put it on storage every node of the "
        "cluster mounts at the same path and pass --shared-model with that path in model.onnx"
    )


def _check_carry(what: str, size: int) -> None:
    """Refuse an upload Ray would refuse: its size, with a margin for the spec and the zip's
    own headers."""
    if size + (1 << 20) >= CARRY_LIMIT:
        raise _too_large(what, size)


def model_files(model: Path) -> list[tuple[Path, str]]:
    """(local file, path in the working_dir) for the model and its external-data files."""
    # Here, not at the top: `onnx` takes 0.2-0.6 s to import (ml_dtypes), and every command
    # (`--help`, query, schedule, inspect) imports this module to register itself.
    from batch_infer.model import external_data_files, load_graph

    if not model.is_file():
        raise SpecError(
            f"model.onnx: {model}: no such file here (a submitted job carries the model from "
            "this machine; if it lives on storage the cluster's nodes mount, pass --shared-model)"
        )
    if model.stat().st_size >= CARRY_LIMIT:
        raise _too_large(f"model.onnx: {model}", model.stat().st_size)
    files = [(model, f"{MODEL_DIR}/{model.name}")]
    for location in external_data_files(load_graph(str(model))):
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise SpecError(
                f"model.onnx: {model} keeps weights in {location!r}, outside its folder; "
                "it cannot be carried: put the model on shared storage and pass --shared-model"
            )
        if not (model.parent / location).is_file():
            raise SpecError(f"model.onnx: {model} refers to {location}, which is missing")
        files.append((model.parent / location, f"{MODEL_DIR}/{location}"))
    _check_carry(f"model.onnx: {model} with its external-data files", _total(files))
    return files


def side_files(model: dict[str, Any]) -> list[tuple[Path, str]]:
    """(local file, path in the working_dir) for each tokenizer.json and labels file the
    spec's `model` section names on this machine; `model` is changed to name the copies."""
    places = [
        (f"model.inputs.{name}.tokenizer", value, "tokenizer")
        for name, value in model["inputs"].items()
        if isinstance(value, dict) and value.get("tokenizer")
    ]
    if isinstance(model.get("postprocess"), dict) and model["postprocess"].get("labels"):
        places.append(("model.postprocess.labels", model["postprocess"], "labels"))
    carried: dict[Path, str] = {}
    for key, holder, field in places:
        if is_uri(raw := holder[field]):
            continue
        src = Path(raw).expanduser().resolve()
        if not src.is_file():
            raise SpecError(f"{key}: {raw}: no such file here (a submitted job carries it)")
        holder[field] = carried.setdefault(src, f"{FILES_DIR}/{len(carried)}/{src.name}")
    return list(carried.items())


def hook_modules(model: dict[str, Any]) -> list[str]:
    """The local folder (or .py file) of each hook's top-level package, for `py_modules`:
    the cluster imports the hooks from the copies. Compiled or built-in modules are not
    carried: they must be installed on the nodes like any library."""
    paths: list[str] = []
    for key in ("preprocess", "postprocess"):
        if not isinstance(name := model.get(key), str):
            continue
        top = name.partition(":")[0].split(".")[0]
        if top == batch_infer.__name__:
            continue  # carried already
        try:
            found = importlib.util.find_spec(top)
        except (ImportError, ValueError):
            found = None
        if found is None:
            raise SpecError(
                f"model.{key}: {name!r}: no module {top!r} here; a submitted job carries the "
                "hook's package from this machine: install it, or add its folder to PYTHONPATH"
            )
        if found.submodule_search_locations:
            path = next(iter(found.submodule_search_locations))
        elif found.origin and found.origin.endswith(".py"):
            path = found.origin
        else:
            continue
        if path not in paths:
            paths.append(path)
    return paths


def _total(files: list[tuple[Path, str]]) -> int:
    return sum(src.stat().st_size for src, _ in files)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _is_local_address(address: str) -> bool:
    """Whether the dashboard address names this machine (so its local paths are the cluster's)."""
    host = urlsplit(address).hostname or ""
    if host in ("localhost", "localhost.localdomain", "ip6-localhost"):
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return host in (socket.gethostname(), socket.getfqdn())


def path_warning(key: str, raw: str, resolved: str, cluster_is_local: bool) -> str | None:
    """What may keep the cluster from reaching a path the spec names, if anything."""
    scheme = raw.split("://", 1)[0].lower() if is_uri(raw) else "file"
    if scheme not in URI_SCHEMES:
        return (
            f"{key}: {raw}: pyarrow.fs may not read {scheme}:// ({', '.join(URI_SCHEMES)} it does)"
        )
    if not is_uri(raw) and not os.path.isabs(os.path.expanduser(raw)):
        return (
            f"{key}: {raw!r} is relative: sent as {resolved}, resolved on this machine; the job "
            "runs on the cluster, where that path must exist: give an absolute path on storage "
            "every node sees, or a URI (s3://, gs://, hdfs://, file://)"
        )
    if scheme == "file" and not cluster_is_local:
        return (
            f"{key}: {raw} is a path on the cluster's nodes: every node must see it at the same "
            "place (shared storage), or give a URI (s3://, gs://, hdfs://)"
        )
    return None


class Submission:
    """A validated spec and what goes with it to the cluster; nothing here contacts one."""

    def __init__(
        self,
        spec_path: str,
        sets: list[str],
        *,
        shared_model: bool,
        cluster_is_local: bool,
        overwrite: bool = False,
        date: dt.date | None = None,
    ) -> None:
        raw = load_document(spec_path)
        overrides = parse_overrides(sets)
        # {date} is filled in here, once: the driver gets the same date with --date.
        self.spec = resolve_spec(raw, overrides, date, where=spec_path)
        self.overwrite = overwrite
        given = copy.deepcopy(raw)  # the paths as written, after the overrides
        for key, value in overrides.items():
            set_dotted(given, key, value)
        carried = not shared_model and not is_uri(self.spec.model.onnx)
        self.model_files = model_files(Path(self.spec.model.onnx)) if carried else []
        # where the model lives, which the run records rather than the path of Ray's upload
        self.origin = str(self.model_files[0][0]) if carried else self.spec.model.onnx
        checks = [("input", "path"), ("output", "path")] + ([] if carried else [("model", "onnx")])
        doc = self.spec.model_dump(mode="json")
        self.warnings = [
            w
            for s, k in checks
            if (w := path_warning(f"{s}.{k}", str(given[s][k]), doc[s][k], cluster_is_local))
        ]
        doc.pop("date", None)  # never written in a spec: the entrypoint passes --date
        if carried:  # relative: resolved in the job's working_dir
            doc["model"]["onnx"] = self.model_files[0][1]
        self.side_files = side_files(doc["model"])  # relative too, rewritten in `doc`
        _check_carry("the model, tokenizer and labels", _total(self.files))
        self.hook_modules = hook_modules(doc["model"])
        for module in self.hook_modules:
            _check_carry(f"the hook package {module}", _size(Path(module)))
        for section, key in (("input", "path"), ("output", "path"), ("model", "onnx")):
            # filled in already: braces left in a path are literal ones
            doc[section][key] = doc[section][key].replace("{", "{{").replace("}", "}}")
        self.spec_text = yaml.safe_dump(doc, sort_keys=False)

    @property
    def files(self) -> list[tuple[Path, str]]:
        """(local file, path in the working_dir) of every file carried beside the spec."""
        return self.model_files + self.side_files

    def entrypoint(self) -> str:
        argv = ["python", "-m", "batch_infer.cli", "run", SPEC_NAME]
        argv += ["--date", self.spec.date] if self.spec.date else []
        return shlex.join(argv + (["--overwrite"] if self.overwrite else []))

    def metadata(self) -> dict[str, str]:
        meta = {
            "batch_infer_job": self.spec.name,
            "batch_infer_output": self.spec.output.path,
            "batch_infer_model": self.origin,
        }
        return meta | ({"batch_infer_date": self.spec.date} if self.spec.date else {})

    def runtime_env(self, working_dir: str) -> dict[str, Any]:
        """Logs promptly, a summary table wide enough for long paths, the model's origin, and
        the `BATCH_INFER_*` knobs set here."""
        env = {"PYTHONUNBUFFERED": "1", "COLUMNS": "200", **settings_set_here()}
        env |= {MODEL_ORIGIN_ENV: self.origin} if self.model_files else {}
        package = str(Path(batch_infer.__file__).resolve().parent)  # the one running here
        return {
            "working_dir": working_dir,
            "py_modules": [package, *self.hook_modules],
            "excludes": ["__pycache__"],
            "env_vars": env,
        }

    def describe(self) -> dict[str, Any]:
        """What `submit --dry-run` prints: everything that would be sent."""
        files = {SPEC_NAME: "the spec below"}
        files |= {rel: f"{src} ({src.stat().st_size:,} bytes)" for src, rel in self.files}
        return {
            "entrypoint": self.entrypoint(),
            "runtime_env": self.runtime_env(working_dir="(a temporary folder)") | {"files": files},
            "metadata": self.metadata(),
            "spec": yaml.safe_load(self.spec_text),
        }

    @contextlib.contextmanager
    def staged(self) -> Iterator[dict[str, Any]]:
        """The runtime_env, its working_dir staged in a temporary folder for the upload."""
        with tempfile.TemporaryDirectory(prefix="batch-infer-submit-") as tmp:
            (Path(tmp) / SPEC_NAME).write_text(self.spec_text)
            for src, rel in self.files:
                (Path(tmp) / rel).parent.mkdir(parents=True, exist_ok=True)
                try:
                    os.link(src, Path(tmp) / rel)
                except OSError:  # another filesystem
                    shutil.copy2(src, Path(tmp) / rel)
            yield self.runtime_env(tmp)


def resolve_address(address: str | None) -> str | None:
    """The dashboard's HTTP address: --address, else RAY_API_SERVER_ADDRESS, else an http
    RAY_ADDRESS; None when there is none."""
    ray_address = os.environ.get("RAY_ADDRESS", "")
    http = ray_address if ray_address.startswith(("http://", "https://")) else ""
    if not (address := address or os.environ.get("RAY_API_SERVER_ADDRESS") or http):
        return None
    address = address if "://" in address else "http://" + address
    expected = "expected the dashboard's, e.g. http://HEAD:8265"
    if address.split("://", 1)[0] not in ("http", "https"):
        raise UserError(f"--address {address}: {expected}")
    try:
        urllib.parse.urlsplit(address).port  # noqa: B018 - raises for a port out of range
    except ValueError as exc:
        raise UserError(f"--address {address}: {exc}; {expected}") from None
    return address.rstrip("/")


def read_token() -> tuple[str | None, str]:
    """(the token or None, where it was looked for), in the order Ray documents
    (https://docs.ray.io/en/latest/ray-security/token-auth.html): RAY_AUTH_TOKEN, the file
    RAY_AUTH_TOKEN_PATH names (unreadable or empty is an error, as in Ray), ~/.ray/auth_token."""
    if token := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return token, "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        source = f"the file RAY_AUTH_TOKEN_PATH names ({path})"
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise UserError(f"cannot read the Ray token from {source}: {exc}") from None
        if not token:
            raise UserError(f"{source} is empty; it should hold the cluster's token")
        return token, source
    default = Path.home() / ".ray" / "auth_token"
    with contextlib.suppress(OSError):
        return default.read_text().strip() or None, str(default)
    return None, str(default)


class Cluster:
    """A JobSubmissionClient whose failures become one-line errors with the right exit code."""

    def __init__(self, address: str | None) -> None:
        import requests
        from ray.job_submission import JobSubmissionClient

        if not (resolved := resolve_address(address)):
            raise UserError(
                "no cluster address: pass --address http://HEAD:8265 (the head's dashboard) or "
                "set RAY_API_SERVER_ADDRESS"
            )
        self.address, self.token_source = resolved, None  # token_source: set when one is sent
        with self.errors():  # public, answered without a token (dashboard/http_server_head.py)
            r = requests.get(f"{resolved}/api/authentication_mode", timeout=10)
        mode, headers = None, {}
        with contextlib.suppress(ValueError, AttributeError):  # not JSON: a Ray before 2.52
            mode = r.json().get("authentication_mode") if r.ok else None
        if mode == "token":
            token, source = read_token()
            if token is None:
                raise UserError(self._no_token())
            headers, self.token_source = {"Authorization": f"Bearer {token}"}, source
        for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
            logging.getLogger(name).setLevel(logging.WARNING)  # "Uploading package ..."
        # JobSubmissionClient takes RAY_API_SERVER_ADDRESS / RAY_ADDRESS over its argument.
        names = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
        saved = {k: os.environ.pop(k) for k in names if k in os.environ}
        try:
            with self.errors():
                self.client = JobSubmissionClient(resolved, headers=headers)
        finally:
            os.environ.update(saved)

    def _no_token(self) -> str:
        return (
            f"the Ray cluster at {self.address} requires a token (it runs with RAY_AUTH_MODE="
            "token) and none was found here: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a "
            "file holding it, or put it in ~/.ray/auth_token (`ray get-auth-token` on the head "
            "prints it)"
        )

    def _http_error(self, status: int, body: str, job_id: str | None) -> UserError:
        """An HTTP error as ours: its status decides the exit code, its last line says why."""
        lines = [ln.strip() for ln in body.strip().rstrip(".").splitlines() if ln.strip()]
        why = lines[-1] if lines else f"HTTP {status}"  # a traceback's last line says what
        if status == 401 or (status == 403 and not self.token_source):
            return UserError(self._no_token())
        if status == 403:
            return UserError(
                f"the Ray cluster at {self.address} refused the token from {self.token_source}:"
                " it is not the cluster's token (`ray get-auth-token` on the head prints it)"
            )
        if status == 404 and job_id:
            return NoSuchJob(f"the Ray cluster at {self.address} has no job {job_id}")
        if status >= 500:
            return ClusterError(f"the Ray dashboard at {self.address} failed ({status}): {why}")
        return UserError(f"the Ray dashboard at {self.address} refused ({status}): {why}")

    @contextlib.contextmanager
    def errors(self, job_id: str | None = None) -> Iterator[None]:
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError:  # the SDK's answer to 401 and 403: which one, we know
            raise self._http_error(403 if self.token_source else 401, "", job_id) from None
        except aiohttp.WSServerHandshakeError as exc:
            raise self._http_error(exc.status, exc.message, job_id) from None
        except requests.HTTPError as exc:  # the SDK's version check: raise_for_status()
            raise self._http_error(exc.response.status_code, exc.response.text, job_id) from None
        except RuntimeError as exc:  # any answer but 200, or a broken log stream
            if m := _STATUS.search(str(exc)):
                raise self._http_error(int(m.group(1)), m.group(2), job_id) from None
            raise ClusterError(f"the Ray dashboard at {self.address}: {exc}") from None
        except (requests.RequestException, aiohttp.ClientError, OSError, asyncio.TimeoutError):
            raise ClusterError(
                f"cannot reach the Ray dashboard at {self.address}: is the head running, with "
                "its dashboard, and is this its port (8265 by default)?"
            ) from None

    def info(self, job_id: str) -> Any:
        with self.errors(job_id):
            return self.client.get_job_info(job_id)

    def wait(self, job_id: str) -> Any:
        while str((info := self.info(job_id)).status) not in TERMINAL:
            time.sleep(1.0)
        return info

    def follow(self, job_id: str) -> None:
        """Copy the job's logs to stdout until the job ends or stdout's reader leaves; a
        stream that ends before the job does is a ClusterError."""

        async def tail() -> bool:
            stream = aiter(self.client.tail_job_logs(job_id))
            stall = setting("BATCH_INFER_STALL_NOTICE_SECONDS")
            quiet, chunk, since = stall, None, time.monotonic()
            while True:  # the next chunk is waited for, never cancelled: that ends the stream
                chunk = chunk or asyncio.ensure_future(anext(stream))
                left = since + quiet - time.monotonic()
                if not (await asyncio.wait({chunk}, timeout=max(0.0, left)))[0]:
                    status = str((await asyncio.to_thread(self.info, job_id)).status)
                    why = PENDING_WHY if status == "PENDING" else ""
                    silent = time.monotonic() - since
                    if status not in TERMINAL:  # else its last lines are on their way
                        note(f"job {job_id} is {status}{why}; nothing logged for {silent:.0f} s")
                    quiet *= 2  # the next notice once the silence has lasted twice as long
                    continue
                done, chunk, quiet, since = chunk, None, stall, time.monotonic()
                try:
                    if not emit(done.result()):
                        return False
                except StopAsyncIteration:
                    return True

        with self.errors(job_id):
            if asyncio.run(tail()) and str(self.info(job_id).status) not in TERMINAL:
                raise RuntimeError("the log stream ended while the job runs on")


def emit(text: str) -> bool:
    """Write to stdout; False once its reader has gone (`| head`), and later writes go nowhere:
    a command piped into `head` exits 0, and `submit --wait` still waits for its job."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
        return True
    except BrokenPipeError:
        drop_stdout()
        return False


def _outcome(info: Any) -> int:
    status = str(info.status)
    message = f"job {info.submission_id}: {status}"
    if info.message and status != "SUCCEEDED":  # Ray appends the logs' tail: shown above
        message += f" ({info.message.strip().split(', last available logs')[0].splitlines()[0]})"
    note(message, "green" if status == "SUCCEEDED" else "red")
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED" and info.driver_exit_code:
        return int(info.driver_exit_code)  # batch-infer run's own code: 2, 3 or 4
    return EXIT_JOB_NOT_SUCCEEDED


def cmd_submit(args: argparse.Namespace) -> int:
    check_settings()  # a bad knob: one line, before anything is sent
    address = resolve_address(args.address)
    submission = Submission(
        args.spec,
        args.set,
        shared_model=args.shared_model,
        cluster_is_local=bool(address) and _is_local_address(address),
        overwrite=args.overwrite,
        date=parse_date(args.date) if args.date else None,
    )
    for warning in submission.warnings:
        note("warning: " + warning, "yellow")
    if args.dry_run:  # nothing is sent, not even to check the address or the token
        emit(yaml.safe_dump(submission.describe(), sort_keys=False, width=100))
        return 0
    cluster = Cluster(address)
    if args.submission_id:  # Ray answers a taken ID with a traceback: say it in one line
        with contextlib.suppress(NoSuchJob):
            status = cluster.info(args.submission_id).status
            raise UserError(
                f"--submission-id {args.submission_id}: the Ray cluster at {cluster.address} "
                f"already has a job with this ID ({status}); pick another ID"
            )
    with submission.staged() as runtime_env, cluster.errors():
        job_id = cluster.client.submit_job(
            entrypoint=submission.entrypoint(),
            runtime_env=runtime_env,
            metadata=submission.metadata(),
            submission_id=args.submission_id,
        )
    emit(job_id + "\n")
    spec = submission.spec
    carried = f", model {submission.origin}" if submission.model_files else ""
    carried += "".join(f", {src}" for src, _ in submission.side_files)
    carried += "".join(f", hooks {path}" for path in submission.hook_modules)
    dated = f" for {spec.date}" if spec.date else ""
    note(
        f"submitted {spec.name}{dated} as {job_id} to {cluster.address} (carried: the spec, "
        f"batch_infer{carried}); output: {spec.output.path}"
    )
    if not args.wait:
        note(f"follow it: batch-infer jobs logs {job_id} --follow --address {cluster.address}")
        return 0
    try:
        try:
            cluster.follow(job_id)
        except ClusterError as exc:  # the outcome may still be known: ask for it
            note(f"{exc}; waiting for the job to end")
        return _outcome(cluster.wait(job_id))
    except KeyboardInterrupt:
        note(
            f"stopped following; the job keeps running. Follow: batch-infer jobs logs {job_id} "
            f"--follow; stop: batch-infer jobs stop {job_id} (add --address {cluster.address})"
        )
        return 130


def job_record(info: Any) -> dict[str, Any]:
    """One job as `jobs list/status --json` print it (times in UTC, ISO 8601)."""

    def when(ms: int | None) -> str | None:
        utc = dt.timezone.utc
        return dt.datetime.fromtimestamp(ms / 1000, utc).isoformat("T", "seconds") if ms else None

    meta = info.metadata or {}
    return {
        "id": info.submission_id,
        "status": str(info.status),
        "name": meta.get("batch_infer_job"),
        "date": meta.get("batch_infer_date"),
        "output": meta.get("batch_infer_output"),
        "model": meta.get("batch_infer_model"),
        "started_at": when(info.start_time),
        "ended_at": when(info.end_time),
        "driver_exit_code": info.driver_exit_code,
        "message": info.message,
        "entrypoint": info.entrypoint,
    }


def cmd_jobs_list(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    with cluster.errors():
        jobs = [j for j in cluster.client.list_jobs() if j.submission_id]  # drivers: no logs
    if not args.all:
        jobs = [j for j in jobs if (j.metadata or {}).get("batch_infer_job")]
    records = [job_record(j) for j in sorted(jobs, key=lambda j: j.start_time or 0)]
    if args.json:
        emit(json_rows(records))
        return 0
    keys = ("id", "status", "name", "started_at", "ended_at", "output")
    rows = [("ID", "STATUS", "SPEC", "STARTED", "ENDED", "OUTPUT")]
    rows += [tuple(r[k] or "-" for k in keys) for r in records]
    widths = [max(len(r[i]) for r in rows) for i in range(len(keys) - 1)]
    emit("".join("  ".join([*map(str.ljust, r, widths), r[-1]]) + "\n" for r in rows))
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    r = job_record(Cluster(args.address).info(args.id))
    if args.json:
        emit(json.dumps(r, indent=1) + "\n")
        return 0
    rest = {
        k: str(v).strip() for k, v in r.items() if k not in ("id", "status") and v not in (None, "")
    }
    emit("\n".join([f"{r['id']}: {r['status']}", *(f"  {k}: {v}" for k, v in rest.items())]) + "\n")
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    if args.follow:
        cluster.follow(args.id)
        return 0
    with cluster.errors(args.id):
        emit(cluster.client.get_job_logs(args.id))
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    with cluster.errors(args.id):
        stopping = cluster.client.stop_job(args.id)
    if not stopping:
        note(f"job {args.id} is not running ({cluster.info(args.id).status})")
        return 0
    note(f"stop requested for {args.id}; committed shards are kept, resubmit to resume")
    if args.wait:
        note(f"job {args.id}: {cluster.wait(args.id).status}")
    return 0


def cmd_jobs_delete(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    status = str(cluster.info(args.id).status)
    if status not in TERMINAL:  # Ray would answer with a server error (HTTP 500)
        raise UserError(f"job {args.id} is {status}: stop it first (batch-infer jobs stop --wait)")
    with cluster.errors(args.id):
        cluster.client.delete_job(args.id)
    note(f"deleted job {args.id} ({status}) from {cluster.address}; its output is kept")
    return 0


def register(subparsers: Any) -> None:
    """Add `submit` and `jobs {list,status,logs,stop,delete}` to the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--address", help="the dashboard, e.g. http://HEAD:8265 (default: "
                        "RAY_API_SERVER_ADDRESS)")  # fmt: skip
    s = subparsers.add_parser("submit", parents=[common], help="run a job spec on a Ray cluster "
                              "(Ray Jobs); resubmit to resume")  # fmt: skip
    s.add_argument("spec", help="the job spec (YAML)")
    add_spec_arguments(s, run=True)
    s.add_argument("--wait", action="store_true", help="follow the logs; exit with the job's code")
    s.add_argument("--shared-model", action="store_true", help="do not carry model.onnx: every "
                   "node of the cluster sees it at that path")  # fmt: skip
    s.add_argument("--submission-id", help="the job's ID (default: Ray's)")
    s.add_argument("--dry-run", action="store_true", help="print what would be sent; send nothing")
    s.set_defaults(func=cmd_submit)
    j = subparsers.add_parser("jobs", help="list, inspect, follow, stop, delete submitted jobs")
    jobs = j.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    parsers = {}
    for name, func, text in (
        ("list", cmd_jobs_list, "the cluster's batch-infer jobs"),
        ("status", cmd_jobs_status, "a job's status"),
        ("logs", cmd_jobs_logs, "a job's logs"),
        ("stop", cmd_jobs_stop, "stop a job (resubmit to resume it)"),
        ("delete", cmd_jobs_delete, "delete a finished job's record and logs (not its output)"),
    ):
        p = parsers[name] = jobs.add_parser(name, parents=[common], help=text)
        p.set_defaults(func=func)
        if name != "list":
            p.add_argument("id", help="the submission ID")
    parsers["list"].add_argument(
        "--all", action="store_true", help="every job, not only batch-infer's"
    )
    parsers["list"].add_argument("--json", action="store_true", help="JSON, one job per line")
    parsers["status"].add_argument("--json", action="store_true", help="JSON")
    parsers["logs"].add_argument("-f", "--follow", action="store_true", help="until the job ends")
    parsers["stop"].add_argument("--wait", action="store_true", help="wait until it has stopped")
