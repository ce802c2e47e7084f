"""A run's timeline as one self-contained HTML file: `batch-infer inspect OUT --timeline F`.

One lane per inference actor (and one for the run's own process), each shard a bar: its
reading and converting (light) and its inference (dark), a tick where it was committed; the
run's phases as labelled lines. Inline SVG and CSS, no script and no server: it opens from
a file, and attaches to a ticket.
"""

from __future__ import annotations

import html
from typing import Any

from batch_infer.errors import OutputError
from batch_infer.location import Location
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
    records = [RunRecord.from_json(out.read_json(f"{RUNS}/{i.base_name}")) for i in runs]
    if run_id is None:
        return max(records, key=lambda r: r.started_at)
    for record in records:
        if record.run_id == run_id:
            return record
    known = ", ".join(sorted(r.run_id for r in records))
    raise OutputError(f"{out.given}: no run {run_id!r}; its runs are {known}")


def _lane_name(actor: int | None, stats: dict[int, dict[str, Any]]) -> str:
    if actor is None:
        return "?"
    lane = stats.get(actor, {})
    where = f" GPU {lane['gpu']}" if lane.get("gpu") else ""
    return ("this process" if actor < 0 else f"actor {actor}") + where


def render(record: RunRecord, entries: list[dict[str, Any]]) -> str:
    """The HTML page for one run and its shards' manifest entries (times in epoch seconds)."""
    t0 = record.started_at
    end = max([record.seconds, *record.timeline.values(), 1e-3])
    scale = (WIDTH - LEFT - 20) / end
    stats = {int(a["actor"]): a for a in record.actor_stats}
    lanes = sorted({e.get("actor") for e in entries} | set(stats), key=lambda a: (a is None, a))
    row = {lane: i for i, lane in enumerate(lanes)}
    height = TOP + LANE_HEIGHT * max(1, len(lanes)) + 40

    def x(seconds: float) -> float:
        return LEFT + max(0.0, seconds) * scale

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'font-family="sans-serif" font-size="12">'
    ]
    for step in range(int(end) + 1):  # a grid line a second (every 10 s past a minute)
        if end > 60 and step % 10:
            continue
        parts.append(
            f'<line x1="{x(step):.1f}" y1="{TOP - 8}" x2="{x(step):.1f}" y2="{height - 30}" '
            f'class="grid"/><text x="{x(step):.1f}" y="{height - 16}" '
            f'text-anchor="middle" class="axis">{step} s</text>'
        )
    for i, lane in enumerate(lanes):
        y = TOP + i * LANE_HEIGHT
        busy = stats.get(lane, {}).get("busy_while_running") if lane is not None else None
        label = _lane_name(lane, stats) + (f" · busy {busy:.0%}" if busy is not None else "")
        parts.append(f'<text x="8" y="{y + 17}">{html.escape(label)}</text>')
    def bar(start: float, seconds: float, top: int, tall: int, kind: str, tip: str) -> str:
        width = max(1.0, seconds * scale)
        return (
            f'<rect x="{x(start):.1f}" y="{top}" width="{width:.1f}" height="{tall}" '
            f'class="{kind}"><title>{tip}</title></rect>'
        )

    for e in entries:
        y = TOP + row[e.get("actor")] * LANE_HEIGHT
        prep = e.get("prepare_started", 0) - t0
        infer = e.get("infer_started", 0) - t0
        tip = html.escape(
            f"shard {e['shard']} ({e['file']}, rows {e['row_start']}-{e['row_stop']}): "
            f"{e['rows']} rows, read {e.get('prepare_seconds', 0):.2f} s, "
            f"inference {e.get('infer_seconds', 0):.2f} s"
        )
        if e.get("prepare_started"):
            parts.append(bar(prep, e["prepare_seconds"], y + 4, 8, "read", tip))
        if e.get("infer_started"):
            parts.append(bar(infer, e["infer_seconds"], y + 12, 12, "infer", tip))
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
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222 }}
.grid {{ stroke: #eee }} .axis {{ fill: #888 }}
.read {{ fill: #9ecae1 }} .infer {{ fill: #08519c }} .commit {{ stroke: #31a354; stroke-width: 2 }}
line.phase {{ stroke: #e6550d; stroke-dasharray: 4 3 }} text.phase {{ fill: #e6550d }}
</style></head><body>
<h2>{html.escape(title)}</h2>
<p>{html.escape(summary)}. Light: reading and converting a shard; dark: inference;
green: committed. Dashed: the run's phases.</p>
{"".join(parts)}
</body></html>
"""


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
