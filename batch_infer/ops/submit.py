"""`batch-infer submit` and `batch-infer jobs`: runs on a Ray cluster through Ray Jobs.

`submit` validates the spec here, then hands the run to the cluster's dashboard
(`ray.job_submission.JobSubmissionClient`) with a runtime environment that carries what the
driver needs: the spec (with the `--set` overrides applied), the `batch_infer` package
(`py_modules`) and, unless `--shared-model` says the cluster already sees it, the model file
(and its external-data files). The driver runs `python -m batch_infer.cli run spec.yaml` on
the head; a stopped or failed job resubmitted resumes from the shards it committed.

Token authentication (a cluster started with RAY_AUTH_MODE=token): the dashboard answers 401
without a token and 403 for a wrong one. The token is looked up the way
Ray does it (`RAY_AUTH_TOKEN`, then the file `RAY_AUTH_TOKEN_PATH` names, then
`~/.ray/auth_token`), sent only to a cluster that says it wants one, and never printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import datetime as dt
import ipaddress
import logging
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from rich.console import Console
from rich.text import Text

import batch_infer
from batch_infer.errors import ClusterError, SpecError, UserError
from batch_infer.spec import (
    JobSpec,
    add_spec_arguments,
    load_document,
    parse_date,
    parse_overrides,
    resolve_spec,
    set_dotted,
)

SPEC_NAME = "spec.yaml"  # the carried spec, in the job's working_dir
MODEL_DIR = "model"  # the carried model, in the job's working_dir
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_JOB_NOT_SUCCEEDED = 1  # a job that failed without a driver exit code, or was stopped
URI_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")  # pyarrow.fs
_LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost")
_CHATTY_LOGGERS = (
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
)


class ClusterAuthError(UserError):
    """The cluster requires a token and none was sent, or it refused the one sent: a setup
    problem on this side (exit 2), not one that goes away by retrying."""


class CarryError(UserError):
    """Something the job needs is too large to carry with the submission."""


# --------------------------------------------------------------------------- carrying


def carry_limit() -> int:
    """The largest package (zip) a job submission can carry, in bytes.

    Each working_dir / py_modules package is uploaded in one HTTP PUT to the dashboard, whose
    aiohttp server takes bodies up to DASHBOARD_CLIENT_MAX_SIZE (100 MiB,
    ray/_private/ray_constants.py), and then stored in the GCS, which takes up to
    GCS_STORAGE_MAX_SIZE (512 MiB, the gRPC message limit, ray/_private/runtime_env/packaging.py).
    """
    try:
        from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE
        from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE
    except ImportError:  # pragma: no cover - a Ray without these constants
        return 100 * 1024**2
    return min(int(DASHBOARD_CLIENT_MAX_SIZE), int(GCS_STORAGE_MAX_SIZE))


def _mib(n: int) -> str:
    return f"{n / 1024**2:,.1f} MiB"


def _tree_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )


def _external_data_files(model_path: Path) -> list[str]:
    """Relative locations of the external-data files an ONNX model refers to."""
    import onnx

    try:
        model = onnx.load(str(model_path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError and friends for a corrupt file
        raise SpecError(f"model.onnx: {model_path}: not a readable ONNX model ({exc})") from None
    found: set[str] = set()

    def tensors(graph: Any) -> Iterator[Any]:
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from tensors(attr.g)
                for sub in attr.graphs:
                    yield from tensors(sub)

    for tensor in tensors(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location":
                    found.add(entry.value)
    for location in found:
        if Path(location).is_absolute() or ".." in Path(location).parts:
            raise SpecError(
                f"model.onnx: {model_path} keeps weights in {location!r}, outside its folder; "
                "it cannot be carried: put the model on shared storage and pass --shared-model"
            )
    return sorted(found)


def _too_large(what: str, size: int, limit: int) -> CarryError:
    return CarryError(
        f"{what} is {_mib(size)}; a submitted job carries at most {_mib(limit)} per package "
        "(Ray's dashboard takes uploads up to DASHBOARD_CLIENT_MAX_SIZE, its GCS stores "
        "packages up to GCS_STORAGE_MAX_SIZE): put it on storage every node of the cluster "
        "mounts at the same path and pass --shared-model with that path in model.onnx"
    )


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def package_dir() -> Path:
    """The `batch_infer` package this command runs, carried to the cluster as a py_module."""
    return Path(batch_infer.__file__).resolve().parent


# --------------------------------------------------------------------------- the spec


def _is_uri(path: str) -> bool:
    return "://" in path


def _is_local_address(address: str) -> bool:
    """Whether the dashboard address names this machine (so its local paths are the cluster's)."""
    host = urlsplit(address).hostname or ""
    if host in _LOOPBACK_NAMES:
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return host in (socket.gethostname(), socket.getfqdn())


def path_warnings(key: str, raw: str, resolved: str, cluster_is_local: bool) -> list[str]:
    """What may keep the cluster from reaching a path the spec names."""
    if _is_uri(raw):
        scheme = raw.split("://", 1)[0].lower()
        if scheme not in URI_SCHEMES:
            return [
                f"{key}: {raw} has the scheme {scheme}://, which pyarrow.fs may not read "
                f"(it reads {', '.join(s + '://' for s in URI_SCHEMES)})"
            ]
        if scheme == "file" and not cluster_is_local:
            return [
                f"{key}: {raw} is a path on the cluster's nodes: every node must see it at the "
                "same place (shared storage)"
            ]
        return []
    if not os.path.isabs(os.path.expanduser(raw)):
        return [
            f"{key}: {raw!r} is relative: sent as {resolved}, resolved on this machine; the job "
            "runs on the cluster, where that path must exist: give an absolute path on storage "
            "every node sees, or a URI (s3://, gs://, hdfs://, file://)"
        ]
    if not cluster_is_local:
        return [
            f"{key}: {raw} is a local path: every node of the cluster must see it at the same "
            "place (shared storage), or give a URI (s3://, gs://, hdfs://)"
        ]
    return []


class Submission:
    """A validated spec and the runtime environment that carries it to the cluster."""

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
        self.spec: JobSpec = resolve_spec(raw, overrides, date, where=spec_path)
        given = copy.deepcopy(raw)  # the paths as written, after the overrides
        for key, value in overrides.items():
            set_dotted(given, key, value)
        self.warnings: list[str] = []
        for key, section, resolved in (
            ("input.path", "input", self.spec.input.path),
            ("output.path", "output", self.spec.output.path),
        ):
            self.warnings += path_warnings(
                key, str(given[section]["path"]), resolved, cluster_is_local
            )
        self.shared_model = shared_model
        self.overwrite = overwrite
        self.limit = carry_limit()
        model = self.spec.model.onnx
        raw_model = str(given["model"]["onnx"])
        self.model_files: list[tuple[Path, str]] = []
        if shared_model or _is_uri(model):  # the cluster reads it where it is
            self.carried_model = model
            if not _is_uri(raw_model) and not os.path.isabs(os.path.expanduser(raw_model)):
                self.warnings.append(
                    f"model.onnx: {raw_model!r} is relative: sent as {model}, resolved on this "
                    "machine; with --shared-model every node must see that path"
                )
        else:
            self.model_files = self._model_files(Path(model))
            self.carried_model = self.model_files[0][1]
        self.spec_text = yaml.safe_dump(self._carried_doc(), sort_keys=False)

    def _model_files(self, model: Path) -> list[tuple[Path, str]]:
        """(local file, path in the working_dir) for the model and its external data."""
        if not model.is_file():
            raise SpecError(
                f"model.onnx: {model}: no such file here (a submitted job carries the model "
                "from this machine; if it lives on storage the cluster's nodes mount, pass "
                "--shared-model)"
            )
        size = model.stat().st_size
        if size >= self.limit:
            raise _too_large(f"model.onnx: {model}", size, self.limit)
        files = [(model, f"{MODEL_DIR}/{model.name}")]
        for location in _external_data_files(model):
            src = model.parent / location
            if not src.is_file():
                raise SpecError(f"model.onnx: {model} refers to {location}, which is missing")
            files.append((src, f"{MODEL_DIR}/{location}"))
        total = sum(src.stat().st_size for src, _ in files)
        if total + (1 << 20) >= self.limit:  # a margin for the spec and the zip's own headers
            raise _too_large(
                f"model.onnx: {model} with its {len(files) - 1} external-data file(s)",
                total,
                self.limit,
            )
        return files

    def _carried_doc(self) -> dict[str, Any]:
        doc = self.spec.model_dump(mode="json")
        doc.pop("date", None)  # never written in a spec: the entrypoint passes --date
        doc["model"]["onnx"] = self.carried_model  # relative: resolved in the job's working_dir
        # The paths are filled in already: braces left in them are literal ones.
        for section, key in (("input", "path"), ("output", "path"), ("model", "onnx")):
            doc[section][key] = doc[section][key].replace("{", "{{").replace("}", "}}")
        return doc

    @contextlib.contextmanager
    def runtime_env(self) -> Iterator[dict[str, Any]]:
        """The runtime_env, its working_dir staged in a temporary folder for the upload."""
        pkg = package_dir()
        pkg_size = _tree_size(pkg)
        if pkg_size >= self.limit:
            raise _too_large(f"the batch_infer package ({pkg})", pkg_size, self.limit)
        with tempfile.TemporaryDirectory(prefix="batch-infer-submit-") as tmp:
            work = Path(tmp)
            (work / SPEC_NAME).write_text(self.spec_text)
            for src, rel in self.model_files:
                _link_or_copy(src, work / rel)
            yield {
                "working_dir": str(work),
                "py_modules": [str(pkg)],
                "excludes": ["__pycache__"],
                # Logs promptly; the driver's summary table wide enough for session paths.
                "env_vars": {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"},
            }

    def entrypoint(self) -> str:
        argv = ["python", "-m", "batch_infer.cli", "run", SPEC_NAME]
        if self.spec.date:
            argv += ["--date", self.spec.date]
        if self.overwrite:
            argv.append("--overwrite")
        return shlex.join(argv)

    def metadata(self) -> dict[str, str]:
        meta = {"batch_infer_job": self.spec.name, "batch_infer_output": self.spec.output.path}
        if self.spec.date:
            meta["batch_infer_date"] = self.spec.date
        return meta


# --------------------------------------------------------------------------- the cluster


def resolve_address(address: str | None) -> str:
    """The dashboard's HTTP address: --address, else RAY_API_SERVER_ADDRESS, else an http
    RAY_ADDRESS."""
    if not address:
        address = os.environ.get("RAY_API_SERVER_ADDRESS") or ""
        ray_address = os.environ.get("RAY_ADDRESS") or ""
        if not address and ray_address.startswith(("http://", "https://")):
            address = ray_address
    if not address:
        raise ClusterError(
            "no cluster address: pass --address http://HEAD:8265 (the head's dashboard) or set "
            "RAY_API_SERVER_ADDRESS"
        )
    if "://" not in address:
        address = "http://" + address
    scheme = address.split("://", 1)[0]
    if scheme not in ("http", "https"):
        raise ClusterError(
            f"--address {address}: expected the dashboard's HTTP address, e.g. http://HEAD:8265"
        )
    return address.rstrip("/")


def token_source() -> str:
    """Where Ray's token loader takes the token from, in its order (never the token itself).

    src/ray/rpc/authentication/authentication_token_loader.cc: RAY_AUTH_TOKEN, then the file
    RAY_AUTH_TOKEN_PATH names, then (with ENABLE_K8S_TOKEN_AUTH) the Kubernetes service
    account token, then ~/.ray/auth_token.
    """
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return f"the file RAY_AUTH_TOKEN_PATH names ({os.environ['RAY_AUTH_TOKEN_PATH']})"
    return str(Path.home() / ".ray" / "auth_token")


def _token_header() -> dict[str, str]:
    """{"authorization": "Bearer <token>"} from Ray's own loader, or {} when there is none."""
    from ray._raylet import AuthenticationTokenLoader

    loader = AuthenticationTokenLoader.instance()
    try:
        return dict(loader.get_token_for_http_header(ignore_auth_mode=True) or {})
    except Exception as exc:  # ray.exceptions.AuthenticationError: e.g. an unreadable file
        message = getattr(exc, "message", None) or str(exc)
        raise ClusterAuthError(f"cannot load the Ray token: {message}") from None


def _auth_mode(address: str, verify: bool) -> str | None:
    """The cluster's authentication mode ("token", "disabled"), or None if it does not say.

    GET /api/authentication_mode is one of the dashboard's public paths
    (ray/dashboard/http_server_head.py), answered without a token.
    """
    import requests

    try:
        r = requests.get(f"{address}/api/authentication_mode", timeout=10, verify=verify)
    except requests.exceptions.RequestException as exc:
        raise ClusterError(
            f"cannot reach the Ray dashboard at {address} ({type(exc).__name__}): is the head "
            "running, with its dashboard, and is this its dashboard port (8265 by default)?"
        ) from None
    if r.status_code != 200:
        return None
    try:
        return str(r.json().get("authentication_mode"))
    except ValueError:
        return None


def _no_token_message(address: str) -> str:
    return (
        f"the Ray cluster at {address} requires a token (it runs with RAY_AUTH_MODE=token) and "
        "none was found here: set RAY_AUTH_TOKEN, or RAY_AUTH_TOKEN_PATH to a file holding it, "
        "or put it in ~/.ray/auth_token (`ray get-auth-token` on the head prints it)"
    )


def _refused_message(address: str) -> str:
    return (
        f"the Ray cluster at {address} refused the token from {token_source()}: it is not the "
        "cluster's token (`ray get-auth-token` on the head prints the right one)"
    )


class Cluster:
    """A JobSubmissionClient whose failures become one-line UserErrors."""

    def __init__(self, address: str | None, verify: bool = True) -> None:
        self.address = resolve_address(address)
        mode = _auth_mode(self.address, verify)
        self.sends_token = False
        headers: dict[str, str] = {}
        if mode != "disabled":  # "token", or a dashboard that does not say
            headers = _token_header()
            self.sends_token = bool(headers)
            if mode == "token" and not headers:
                raise ClusterAuthError(_no_token_message(self.address))
        from ray.job_submission import JobSubmissionClient

        for name in _CHATTY_LOGGERS:  # "Uploading package ...": the summary line says it
            logging.getLogger(name).setLevel(logging.WARNING)
        # JobSubmissionClient takes RAY_API_SERVER_ADDRESS / RAY_ADDRESS over its argument.
        saved = {
            k: os.environ.pop(k)
            for k in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
            if k in os.environ
        }
        try:
            with self.errors():
                self.client = JobSubmissionClient(self.address, headers=headers, verify=verify)
        finally:
            os.environ.update(saved)

    @contextlib.contextmanager
    def errors(self, job_id: str | None = None) -> Iterator[None]:
        import aiohttp
        import requests
        from ray.exceptions import AuthenticationError

        try:
            yield
        except AuthenticationError as exc:
            text = getattr(exc, "message", "") or ""
            if text.startswith("Authentication failed") or (
                self.sends_token and not text.startswith("Authentication required")
            ):
                raise ClusterAuthError(_refused_message(self.address)) from None
            raise ClusterAuthError(_no_token_message(self.address)) from None
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise ClusterAuthError(_no_token_message(self.address)) from None
            if exc.status == 403:
                raise ClusterAuthError(_refused_message(self.address)) from None
            raise ClusterError(f"{self.address}: cannot follow the job's logs ({exc})") from None
        except (requests.exceptions.RequestException, aiohttp.ClientError, ConnectionError) as exc:
            raise ClusterError(
                f"cannot reach the Ray dashboard at {self.address} ({type(exc).__name__})"
            ) from None
        except RuntimeError as exc:  # the SDK's "Request failed with status code ..."
            text = str(exc).strip().rstrip(".")
            if job_id and "does not exist" in text:
                raise ClusterError(f"{self.address}: no job {job_id}") from None
            raise ClusterError(f"{self.address}: {text}") from None

    def info(self, job_id: str) -> Any:
        with self.errors(job_id):
            return self.client.get_job_info(job_id)

    def wait(self, job_id: str, poll: float = 1.0) -> Any:
        while True:
            info = self.info(job_id)
            if str(info.status) in TERMINAL:
                return info
            time.sleep(poll)

    def follow(self, job_id: str, out: Any) -> None:
        """Copy the job's logs to `out` as they come, until the job ends."""

        async def tail() -> None:
            async for chunk in self.client.tail_job_logs(job_id):
                out.write(chunk)
                out.flush()

        with self.errors(job_id):
            try:
                asyncio.run(tail())
            except RuntimeError as exc:  # the stream broke: the status still tells the end
                if "does not exist" in str(exc):
                    raise
                _note(f"the log stream of {job_id} broke ({exc}); waiting for the job to end")


# --------------------------------------------------------------------------- commands


def _note(message: str, style: str = "") -> None:
    Console(stderr=True, soft_wrap=True, highlight=False).print(Text(message, style=style))


def _warn(message: str) -> None:
    _note("warning: " + message, "yellow")


def _outcome(info: Any) -> int:
    status = str(info.status)
    message = f"job {info.submission_id}: {status}"
    if info.message and status != "SUCCEEDED":  # Ray appends the logs' tail: shown above
        why = info.message.strip().split(", last available logs")[0].splitlines()[0]
        message += f" ({why})"
    _note(message, "green" if status == "SUCCEEDED" else "red")
    if status == "SUCCEEDED":
        return 0
    if status == "FAILED" and info.driver_exit_code:
        return int(info.driver_exit_code)  # batch-infer run's own code: 2, 3 or 4
    return EXIT_JOB_NOT_SUCCEEDED


def cmd_submit(args: argparse.Namespace) -> int:
    address = resolve_address(args.address)
    submission = Submission(
        args.spec,
        args.set,
        shared_model=args.shared_model,
        cluster_is_local=_is_local_address(address),
        overwrite=args.overwrite,
        date=parse_date(args.date) if args.date else None,
    )
    for warning in submission.warnings:
        _warn(warning)
    cluster = Cluster(address)
    with submission.runtime_env() as runtime_env, cluster.errors():
        job_id = cluster.client.submit_job(
            entrypoint=submission.entrypoint(),
            runtime_env=runtime_env,
            metadata=submission.metadata(),
            submission_id=args.submission_id,
        )
    print(job_id, flush=True)
    carried = f", model {submission.model_files[0][0]}" if submission.model_files else ""
    dated = f" for {submission.spec.date}" if submission.spec.date else ""
    _note(
        f"submitted {submission.spec.name}{dated} as {job_id} to {cluster.address} (carried: the "
        f"spec, batch_infer{carried}); output: {submission.spec.output.path}"
    )
    if not args.wait:
        _note(f"follow it: batch-infer jobs logs {job_id} --follow --address {cluster.address}")
        return 0
    try:
        cluster.follow(job_id, sys.stdout)
        return _outcome(cluster.wait(job_id))
    except KeyboardInterrupt:
        _note(
            f"stopped following; the job keeps running. Follow: batch-infer jobs logs {job_id} "
            f"--follow; stop: batch-infer jobs stop {job_id} (add --address {cluster.address})"
        )
        return 130


def _time(ms: int | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ms / 1000)) if ms else "-"


def cmd_jobs_list(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    with cluster.errors():
        jobs = cluster.client.list_jobs()
    jobs = [j for j in jobs if j.submission_id]  # drivers not submitted have no logs to show
    if not args.all:
        jobs = [j for j in jobs if (j.metadata or {}).get("batch_infer_job")]
    jobs.sort(key=lambda j: j.start_time or 0)
    rows = [("ID", "STATUS", "SPEC", "STARTED", "ENDED", "OUTPUT")]
    for j in jobs:
        meta = j.metadata or {}
        rows.append(
            (
                j.submission_id,
                str(j.status),
                meta.get("batch_infer_job", "-"),
                _time(j.start_time),
                _time(j.end_time),
                meta.get("batch_infer_output", j.entrypoint),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


def cmd_jobs_status(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    info = cluster.info(args.id)
    meta = info.metadata or {}
    print(f"{info.submission_id}: {info.status}")
    if info.message:
        print(f"  {info.message.strip()}")
    if meta.get("batch_infer_job"):
        dated = f"  date: {meta['batch_infer_date']}" if meta.get("batch_infer_date") else ""
        print(
            f"  spec: {meta['batch_infer_job']}{dated}  "
            f"output: {meta.get('batch_infer_output', '-')}"
        )
    print(f"  started: {_time(info.start_time)}  ended: {_time(info.end_time)}")
    if info.driver_exit_code is not None:
        print(f"  driver exit code: {info.driver_exit_code}")
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    if args.follow:
        cluster.follow(args.id, sys.stdout)
        return 0
    with cluster.errors(args.id):
        logs = cluster.client.get_job_logs(args.id)
    sys.stdout.write(logs)
    sys.stdout.flush()
    return 0


def cmd_jobs_stop(args: argparse.Namespace) -> int:
    cluster = Cluster(args.address)
    with cluster.errors(args.id):
        stopping = cluster.client.stop_job(args.id)
    if not stopping:
        _note(f"job {args.id} is not running ({cluster.info(args.id).status})")
        return 0
    _note(f"stop requested for {args.id}; committed shards are kept, resubmit to resume")
    if args.wait:
        _note(f"job {args.id}: {cluster.wait(args.id).status}")
    return 0


def register(subparsers: Any) -> None:
    """Add `submit` and `jobs {list,status,logs,stop}` to the CLI's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--address",
        default=None,
        help="the head's dashboard, e.g. http://HEAD:8265 (default: RAY_API_SERVER_ADDRESS)",
    )
    s = subparsers.add_parser(
        "submit",
        parents=[common],
        help="submit a job spec to a Ray cluster (Ray Job Submission API); resubmit to resume",
    )
    s.add_argument("spec", help="the job spec (YAML)")
    add_spec_arguments(s, run=True)
    s.add_argument(
        "--wait",
        action="store_true",
        help="stream the job's logs; exit 0 if it succeeds, non-zero otherwise",
    )
    s.add_argument(
        "--shared-model",
        action="store_true",
        help="model.onnx is on storage every node mounts at that path: do not carry it",
    )
    s.add_argument("--submission-id", default=None, help="the job's ID (default: Ray's)")
    s.set_defaults(func=cmd_submit)

    j = subparsers.add_parser("jobs", help="list, inspect, follow and stop submitted jobs")
    jobs = j.add_subparsers(dest="jobs_command", required=True, metavar="{list,status,logs,stop}")
    p = jobs.add_parser("list", parents=[common], help="the cluster's batch-infer jobs")
    p.add_argument("--all", action="store_true", help="every submitted job, not only batch-infer")
    p.set_defaults(func=cmd_jobs_list)
    p = jobs.add_parser("status", parents=[common], help="a job's status")
    p.add_argument("id", help="the submission ID")
    p.set_defaults(func=cmd_jobs_status)
    p = jobs.add_parser("logs", parents=[common], help="a job's logs")
    p.add_argument("id", help="the submission ID")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the job ends")
    p.set_defaults(func=cmd_jobs_logs)
    p = jobs.add_parser("stop", parents=[common], help="stop a job (resubmit to resume it)")
    p.add_argument("id", help="the submission ID")
    p.add_argument("--wait", action="store_true", help="wait until it has stopped")
    p.set_defaults(func=cmd_jobs_stop)
