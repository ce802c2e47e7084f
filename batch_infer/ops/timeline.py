"""A run's timeline as one self-contained HTML file: `batch-infer inspect OUT --timeline F`.

One lane per inference actor (and one for the run's own process), each shard a bar: its
reading and converting (light) and its inference (dark), a tick where it was committed; the
run's phases as labelled lines. Inline SVG and CSS, no script and no server: it opens from
a file, and attaches to a ticket.
"""

from __future__ import annotations

import html
import string
from typing import Any

from batch_infer.errors import OutputError
from batch_infer.location import Location
from batch_infer.ops import template
from batch_infer.sink.manifest import PHASES, RUNS, RunRecord, committed_entries

LANE_HEIGHT = 28
LEFT = 190  # room for the lane labels
WIDTH = 1100
TOP = 20 + 14 * 8  # a row per phase label: short runs put phases close together


def load_run(out: Location, run_id: str | None) -> RunRecord:
    """The run `run_id`, or the latest one, of an output."""
    runs = [i for i in out.list(RUNS) if i.base_name.endswith(".json")]
    if not runs:
        raise OutputError(f"{out.given}: no run is recorded in {RUNS}/")
    records = []
    for info in runs:
        try:
            records.append(RunRecord.from_json(out.read_json(f"{RUNS}/{info.base_name}")))
        except (ValueError, TypeError, AttributeError) as exc:
            raise OutputError(f"{info.path}: not a run record ({exc})") from None
    if run_id is None:
        return max(records, key=lambda r: r.started_at)
    for record in records:
        if record.run_id == run_id:
            return record
    known = ", ".join(sorted(r.run_id for r in records))
    raise OutputError(f"{out.given}: no run {run_id!r}; its runs are {known}")


def render(record: RunRecord, entries: list[dict[str, Any]]) -> str:
    """The HTML page for one run and its shards' manifest entries (times in epoch seconds)."""
    t0 = record.started_at
    end = max([record.seconds, *record.timeline.values(), 1e-3])
    scale = (WIDTH - LEFT - 20) / end
    stats = {int(a["actor"]): a for a in record.actor_stats}
    lanes = sorted({e.get("actor") for e in entries} | set(stats), key=lambda a: (a is None, a))
    height = TOP + LANE_HEIGHT * max(1, len(lanes)) + 40

    def x(seconds: float) -> float:
        return LEFT + max(0.0, seconds) * scale

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="sans-serif" font-size="12">'
    ]
    for step in range(0, int(end) + 1, 10 if end > 60 else 1):  # every 10 s past a minute
        parts.append(
            f'<line x1="{x(step):.1f}" y1="{TOP - 8}" x2="{x(step):.1f}" y2="{height - 30}" '
            f'class="grid"/><text x="{x(step):.1f}" y="{height - 16}" '
            f'text-anchor="middle" class="axis">{step} s</text>'
        )
    for i, lane in enumerate(lanes):
        stat = stats.get(lane, {})
        label = "?" if lane is None else "this process" if lane < 0 else f"actor {lane}"
        label += f" GPU {stat['gpu']}" if stat.get("gpu") else ""
        busy = stat.get("busy_while_running")
        label += f" · busy {busy:.0%}" if busy is not None else ""
        parts.append(f'<text x="8" y="{TOP + i * LANE_HEIGHT + 17}">{html.escape(label)}</text>')
    for e in entries:
        y = TOP + lanes.index(e.get("actor")) * LANE_HEIGHT
        tip = html.escape(
            f"shard {e['shard']} ({e['file']}, rows {e['row_start']}-{e['row_stop']}): "
            f"{e['rows']} rows, read {e.get('prepare_seconds', 0):.2f} s, "
            f"inference {e.get('infer_seconds', 0):.2f} s"
        )
        for kind, phase, top, tall in (("read", "prepare", 4, 8), ("infer", "infer", 12, 12)):
            if e.get(f"{phase}_started"):  # reading and converting light, inference dark
                left, width = x(e[f"{phase}_started"] - t0), max(1.0, e[f"{phase}_seconds"] * scale)
                parts.append(
                    f'<rect x="{left:.1f}" y="{y + top}" width="{width:.1f}" height="{tall}" '
                    f'class="{kind}"><title>{tip}</title></rect>'
                )
        if e.get("committed_at"):
            c = x(e["committed_at"] - t0)
            parts.append(
                f'<line x1="{c:.1f}" y1="{y + 2}" x2="{c:.1f}" y2="{y + 26}" class="commit"/>'
            )
    for k, phase in enumerate(p for p in PHASES if p in record.timeline):
        px = x(record.timeline[phase])
        anchor = "end" if px > WIDTH - 200 else "start"
        parts.append(
            f'<line x1="{px:.1f}" y1="{18 + k * 14}" x2="{px:.1f}" y2="{height - 30}" '
            f'class="phase"/><text x="{px + (-3 if anchor == "end" else 3):.1f}" '
            f'y="{14 + k * 14}" text-anchor="{anchor}" class="phase">'
            f"{html.escape(phase.replace('_', ' '))} {record.timeline[phase]:.1f} s</text>"
        )
    parts.append("</svg>")
    title = f"batch-infer run {record.run_id} of {record.name}: {record.status}"
    summary = (
        f"{record.rows_this_run:,} rows in {record.seconds:.1f} s from the process's start; "
        f"{len(entries)} shard(s) of this run; backend {record.backend or '-'}"
    )
    return string.Template(template("timeline.html")).substitute(
        title=html.escape(title), summary=html.escape(summary), svg="".join(parts)
    )


def write_timeline(out: Location, path: str, run_id: str | None = None) -> RunRecord:
    """Draw run `run_id` (default: the latest) of `out` into the HTML file `path`."""
    record = load_run(out, run_id)
    entries = [e.to_json() for e in committed_entries(out).values() if e.run == record.run_id]
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(render(record, entries))
    except OSError as exc:
        raise OutputError(f"--timeline {path}: cannot write it ({exc.strerror})") from None
    return record
