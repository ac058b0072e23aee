"""The reports of the GPU check (bench/gpu/): report.json and report.md (written atomically) and the
one-screen summary it prints at the end."""

from __future__ import annotations

import json
from pathlib import Path

from dimap_fast.atomic import atomic_path, write_text_atomic


def archive_logs(out: Path, logs: Path) -> None:
    """Every step's log as one file, logs.tar.gz, replaced atomically (the folder stays small)."""
    import tarfile

    with atomic_path(out / "logs.tar.gz") as tmp:
        with tarfile.open(tmp, "w:gz") as tar:
            for log in sorted(logs.glob("*.log")):
                tar.add(log, arcname=f"logs/{log.name}")


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return f"{v:.4g}" if v == 0 or 1e-3 <= abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


STATIC = Path(__file__).resolve().parents[2] / "docs" / "bench" / "static.json"  # `make bench` writes it


def attach_estimates(report: dict) -> None:
    """Each row the static cost model estimates gets ``estimate`` beside its measurement, so the
    first GPU run calibrates the model (docs/bench/static.json, committed: the GPU machine compiles
    nothing for it)."""
    try:
        from dimap_fast.cost_model import estimate_for

        rows = json.loads(STATIC.read_text())["results"]
    except (ImportError, OSError, ValueError, KeyError) as exc:
        report["estimates"] = f"none ({type(exc).__name__}: {str(exc)[:100]})"
        return
    report["estimates"] = str(STATIC.relative_to(STATIC.parents[2]))
    for r in report["results"]:
        estimate = estimate_for(r["name"], rows)
        if estimate is not None:
            r["estimate"] = estimate


def write_reports(out: Path, report: dict) -> None:
    attach_estimates(report)
    _breakeven_plot(out, report)
    write_text_atomic(out / "report.json", json.dumps(report, indent=1, allow_nan=False) + "\n")
    write_text_atomic(out / "report.md", render_markdown(report))


def _breakeven_plot(out: Path, report: dict) -> None:
    """Draw the speed step's break-even curves (rows carrying ``points``) as breakeven_gpu.png;
    report["breakeven_plot"] says where, or why not (the rows hold the numbers either way)."""
    rows = [r for r in report["results"] if r.get("points")]
    if not rows:
        return
    panels, marks = {}, {}
    for r in rows:  # speed.breakeven.<group>.<dtype>.b<B>.<candidate> or ....<dtype>.two_four
        parts = r["name"].split(".")
        points = {float(s): v for s, v in r["points"].items()}
        panel = f"{parts[3]} ({report['card']})"
        panels.setdefault(panel, {})
        if parts[-1] == "two_four":
            marks.setdefault(panel, {})["2:4 (50% of weights)"] = next(iter(points.items()))
        else:
            panels[panel][f"{parts[-1].replace('torch_bsr', 'torch BSR')} B={parts[4][1:]}"] = points
    try:
        from breakeven import plot  # bench/breakeven.py; needs matplotlib

        plot(panels, out / "breakeven_gpu.png", f"Swin-B stage-3 MLP ({rows[0]['name'].split('.')[2]}): "
             "speed-up over dense F.linear", marks)
        report["breakeven_plot"] = "breakeven_gpu.png"
    except Exception as exc:  # noqa: BLE001 - no matplotlib on the GPU machine: the rows still say it all
        report["breakeven_plot"] = f"not drawn ({type(exc).__name__}: {str(exc)[:100]})"


def render_markdown(report: dict) -> str:
    rows = report["results"]
    targets = [r for r in rows if r["target"] is not None and r["met"] is not None]  # judged in this run
    met = sum(r["met"] is True for r in targets)
    lines = [f"# GPU check{' (dry run, CPU interpreter: timings meaningless)' if report['dry_run'] else ''}", "",
             f"- card: {report['card']}, driver {report['driver'] or '-'}",
             f"- torch {report['torch']}, triton {report['triton']}, timm {report['timm']}"
             + (f" (wheels: {', '.join(report['wheels'])})" if report.get("wheels") else ""),
             f"- started {report['started']}, {report['seconds']:.0f} s",
             f"- **{met} of {len(targets)} targets met**",
             *([f"- break-even plot: {report['breakeven_plot']}"] if report.get("breakeven_plot") else []),
             f"- estimates (static cost model of an H100, before any measurement): {report.get('estimates', '-')}", "",
             "Budgets are for a cold machine: work other than compiling plus the Triton compiles counted "
             "for the step with nothing run (planned; at the estimated seconds each), beside those a real "
             "run counted.", "",
             "| step | status | seconds | budget s | compiles planned | compile s (est.) | compiles counted | error |",
             "|---|---|---:|---:|---:|---:|---:|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']:.1f} | {_fmt(s.get('budget_s'))} | "
              f"{_fmt(s.get('compiles_planned'))} | {_fmt(s.get('compile_s_estimate'))} | "
              f"{_fmt(s.get('compiles_counted'))} | {s['error'] or ''} |" for s in report["steps"]]
    for step in dict.fromkeys(r["step"] for r in rows):
        lines += ["", f"## {step}", "", "| row | value | estimate | unit | target | met | note |",
                  "|---|---:|---:|---|---|---|---|"]
        for r in (r for r in rows if r["step"] == step):
            source = r.get("source") if "issue" in (r.get("source") or "") else None
            note = "; ".join(filter(None, [source, r.get("note"), r.get("error") and f"error: {r['error']}"]))
            note = note.replace("|", "/")
            mark = {True: "yes", False: "**NO**", None: ""}[r["met"]]
            lines.append(f"| {r['name']} | {_fmt(r['value'])} | {_fmt(r.get('estimate'))} | {r['unit']} | "
                         f"{r['target'] or ''} | {mark} | {note} |")
    return "\n".join(lines) + "\n"


def print_summary(report: dict, out: Path) -> None:
    """About 30 lines: steps, then targets; the correctness targets of a step (of a kernel, for
    ``kernels``) fold into one line when all are met, every speed target has a line."""
    print("\n" + ("DRY RUN (timings meaningless) " if report["dry_run"] else "") + f"summary, {report['card']}:")
    for s in report["steps"]:
        plan = (f"  budget {s['budget_s']} s, {s['compiles_planned']} compiles planned"
                + (f", {s['compiles_counted']} counted" if s.get("compiles_counted") is not None else "")
                if "budget_s" in s else "")
        print(f"  {s['name']:<9} {s['status']:<8} {s['seconds']:7.1f} s{plan}" + (f"  {s['error']}" if s["error"] else ""))
    targets = [r for r in report["results"] if r["target"] is not None and r["met"] is not None]
    groups: dict[str, list[dict]] = {}
    for r in targets:
        parts = r["name"].split(".")
        groups.setdefault(".".join(parts[:2]) if parts[0] == "kernels" else parts[0], []).append(r)
    for key, rs in groups.items():
        met = sum(bool(r["met"]) for r in rs)
        why = {r.get("error") or r.get("note") for r in rs if not r["met"]}
        if key == "speed" and report["dry_run"]:
            print(f"  --   speed.*  {len(rs)} rows present; a dry run's timings mean nothing")
            continue
        if key != "speed" and len(rs) > 1 and (met == len(rs) or (len(rs) - met > 3 and len(why) == 1)):
            print(f"  {'ok  ' if met == len(rs) else 'MISS'} {key}.*  {met} of {len(rs)} met"
                  + (f"; the others: {why.pop()}" if why else "")[:150])
            continue
        for r in rs:
            mark = "ok  " if r["met"] else "MISS"
            value = f"{_fmt(r['value'])}{'x' if r['unit'] == 'x' and r['value'] is not None else ''}"
            extra = "" if r["met"] else r.get("error") or r.get("note") or ""
            print(f"  {mark} {r['name']:<46} {value:>10} {r['target']:<10} {extra}"[:150])
    shown = [r for r in report["results"] if r["target"] is not None and r["met"] is None]
    if shown:
        print("  --   a real run's targets, judged on a GPU: "
              + ", ".join(f"{r['name']} {r['target']}" for r in shown)[:140])
    met = sum(r["met"] is True for r in targets)
    timed = sum(r["step"] == "speed" for r in targets)
    caveat = f" (its {timed} speed targets mean nothing in a dry run)" if report["dry_run"] else ""
    print(f"{met} of {len(targets)} targets met{caveat}; report: {out / 'report.md'}", flush=True)
