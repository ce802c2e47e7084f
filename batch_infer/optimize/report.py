"""`batch-infer optimize`'s screen: the report `optimize_plan` leaves in `JobPlan.optimized`."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

SHOWN_LAYERS = 40  # TensorRT layers listed on screen (all are in --json)
SHOWN_NODES = 12  # names of nodes left in higher precision shown on screen


def _mb(n: int) -> str:
    return f"{n / 1e6:,.2f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} kB"


def _counts(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items(), key=lambda kv: -kv[1])) or "-"


def higher_precision(report: dict) -> list[dict]:
    """Matrix-multiplying nodes of the optimized model left in fp32 by an fp16, int8 or fp8
    recipe (they compute in the original's precision)."""
    if report["recipe"]["precision"] == "fp32":
        return []
    return [n for n in report["after"]["compute_nodes"] if n["precision"] == "fp32"]


def print_report(report: dict, console: Console) -> None:
    """The report as tables: what was done, what it changed, the gate, the speed."""
    t = Table(title="batch-infer optimize", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    before, after = report["before"], report["after"]
    recipe = report["recipe"]
    t.add_row("model", f"{report['model']} (sha256 {report['source_sha256'][:12]})")
    t.add_row(
        "optimized",
        f"{report.get('optimized_model', '-')} (sha256 {report.get('optimized_sha256', '-')[:12]}"
        f"{', from the cache' if report.get('cached') else ''})",
    )
    t.add_row("target", f"{report['target']['name']} ({report['target']['why']})")
    t.add_row("recipe", ", ".join(f"{k} {v}" for k, v in recipe.items() if k != "target"))
    t.add_row("nodes", f"{before['nodes']:,} -> {after['nodes']:,}")
    t.add_row("weights", f"{_mb(before['weights_bytes'])} -> {_mb(after['weights_bytes'])}")
    t.add_row("Q/DQ nodes", _counts(after["qdq"]))
    t.add_row(
        "matmul/conv precision",
        f"{_counts(before['compute_precisions'])} -> {_counts(after['compute_precisions'])}",
    )
    kept = higher_precision(report)
    if kept:
        names = ", ".join(f"{n['node']} ({n['op']})" for n in kept[:SHOWN_NODES])
        more = f" and {len(kept) - SHOWN_NODES} more" if len(kept) > SHOWN_NODES else ""
        t.add_row("kept in fp32", f"{len(kept)}: {names}{more}")
    fusion = report.get("fusion")
    if fusion is not None:
        t.add_row("fused", _counts(fusion["fused"]))
        for note in fusion["not_fused"]:
            t.add_row("not fused", note)
    elif report["target"]["name"].startswith("tensorrt"):
        t.add_row("fused", "by TensorRT at build time (see its layers)")
    cal = report["calibration"]
    t.add_row(
        "rows",
        f"{cal['calibration_rows']} calibration + {cal['gate_rows']} gate rows from "
        f"{len(cal['sources'])} pieces of the input (seed {cal['seed']}, sample "
        f"{cal['fingerprint'][:12]})",
    )
    sparse = after["sparsity_2_4"]
    if sparse:
        ok = sum(1 for s in sparse if s["qualifies"])
        t.add_row("2:4 sparsity", f"{ok} of {len(sparse)} weight tensors follow the pattern")
    speed = report["speed"]
    if "skipped" in speed:
        t.add_row("speed", f"not measured: {speed['skipped']}")
    else:
        t.add_row(
            "speed",
            f"{speed['original_rows_per_s']:,.0f} -> {speed['optimized_rows_per_s']:,.0f} rows/s "
            f"({speed['speedup']:.2f}x) on {speed['ran_on']}, batch {speed['batch']}",
        )
    t.add_row("time", f"{report['seconds']:.1f} s")
    for w in report.get("warnings", []):
        t.add_row("tool warning", w)
    console.print(t)
    _print_gate(report["gate"], console)
    layers = report.get("tensorrt")
    if layers is not None:
        _print_layers(layers, console)


def _print_gate(gate: dict, console: Console) -> None:
    verdict = "passed" if gate["passed"] else "FAILED"
    g = Table(
        title=f"accuracy gate: {verdict} on {gate['rows']} held-out rows ({gate['ran_on']})",
        title_justify="left",
    )
    for col in ("output", "relative L2", "max abs", "cosine", "top-1 agreement"):
        g.add_column(col, justify="left" if col == "output" else "right")

    def cell(f: dict, k: str, fmt: str) -> str:
        return format(f[k], fmt) if k in f else "-"

    for name, f in gate["outputs"].items():
        top1 = f.get("top1_agreement", f.get("agreement"))
        g.add_row(name, cell(f, "rel_l2", ".3g"), cell(f, "max_abs", ".3g"),
                  cell(f, "cosine", ".6f"), "-" if top1 is None else f"{top1:.4f}")  # fmt: skip
    th = gate["thresholds"]
    g.caption = (
        f"gate: relative L2 <= {th['max_rel_l2']}, top-1 agreement >= {th['min_top1_agreement']}"
        + (f", max abs <= {th['max_abs']}" if th.get("max_abs") is not None else "")
        + (f", cosine >= {th['min_cosine']}" if th.get("min_cosine") is not None else "")
        + "".join(f"\nfails: {f}" for f in gate["failures"])
    )
    console.print(g)


def _print_layers(layers: dict, console: Console) -> None:
    if "skipped" in layers:
        console.print(f"TensorRT layers: not built ({layers['skipped']})", highlight=False)
        return
    rows = layers["layers"]
    t = Table(
        title=f"{layers['backend']} engine for compute capability {layers['compute_capability']}"
        f": {len(rows)} layers ({_counts(layers['precisions'])}), from its {layers['source']}",
        title_justify="left",
    )
    for col in ("layer", "type", "precision", "fused ONNX nodes"):
        t.add_column(col)
    for layer in rows[:SHOWN_LAYERS]:
        nodes = layer["onnx_nodes"]
        shown = ", ".join(nodes[:6]) + (f" +{len(nodes) - 6}" if len(nodes) > 6 else "")
        t.add_row(layer["name"], layer["type"], layer["precision"], shown)
    if len(rows) > SHOWN_LAYERS:
        t.caption = f"{len(rows) - SHOWN_LAYERS} more layers in --json"
    console.print(t)
