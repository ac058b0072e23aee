"""Batch pruning: several models x methods x ratios, one output file per triple.

Instead of ratios a sweep can take FLOPs reductions (``flops_reductions``): each output is then
pruned at the smallest ratio that removes that share of the FLOPs (``Plan.ratio_for_flops``), is
named after the reduction, and records the ratio chosen; the models are planned from their
architecture, which checkpoints must name (``--model`` or their metadata).

One model and one plan are alive at a time, so memory stays that of the largest model plus its
plan. Everything a sweep can check without pruning (names, files, headers, architectures, the
outputs already there) is checked before the first file is written.

Each output is written atomically and summary.csv is rewritten (atomically) after every file, so a
sweep stopped at any point (Ctrl-C, SIGTERM, kill -9) leaves only complete files. A rerun removes
the temporary files a killed run left, keeps the outputs that exist (their rows come back from the
old summary.csv) and writes the rest, byte for byte what an uninterrupted run writes.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path

from ..atomic import remove_stale_temps, write_text_atomic
from ..engine.budget import check_budget_pattern
from ..engine.values import METHODS, Pattern, as_pattern, check_reduction, supported
from ..errors import DimapError, check_choice, check_model_name, check_ratio
from ..io.checkpoint import MASK_PREFIX, check_output, checkpoint_path, is_shrunk, looks_like_path, safetensors_header
from ..io.models import check_architecture

SUMMARY = "summary.csv"


def output_name(stem: str, method: str, ratio: float, masks_only: bool, pattern: Pattern = Pattern.unstructured(),
                by_flops: bool = False) -> str:
    """``ratio`` is the FLOPs reduction when ``by_flops``: the name must be known before the ratio is."""
    kind = "masks" if masks_only else "pruned"
    tag = "" if pattern.kind == "unstructured" else f"__{pattern}".replace(":", "of")  # __block32, __channel, __2of4
    cut = f"flops{ratio:g}" if by_flops else f"r{ratio:g}"
    return f"{stem}__{method}{tag}__{cut}.{kind}.safetensors"


def sweep(sources, ratios, methods, out_dir: Path, arch=None, masks_only=False, progress=True,
          pattern: Pattern | str = "unstructured", block_size: int | None = None, flops_reductions=None) -> list[dict]:
    """Prune every source at every ratio (or FLOPs reduction) with every method; returns the summary rows.

    pattern: a Pattern, or its name (with ``block_size`` for "block").
    """
    from tqdm import tqdm

    from ..engine.plan import plan
    from .pruned_file import load_checked, write_pruned

    by_flops = flops_reductions is not None
    if by_flops and ratios is not None:
        raise DimapError("give ratios or FLOPs reductions, not both")
    pattern = supported(as_pattern(pattern, block_size))
    jobs = _check(sources, flops_reductions if by_flops else ratios, methods, Path(out_dir), arch, masks_only, pattern,
                  by_flops)
    out_dir = Path(out_dir)
    made = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DimapError(f"cannot create {out_dir} ({exc.strerror}): choose another --out-dir") from None
    remove_stale_temps(out_dir, [SUMMARY] + [out.name for _, _, _, out in jobs])
    previous = _read_summary(out_dir / SUMMARY)
    rows = []
    bar = tqdm(total=len(jobs), desc="sweep", unit="file", disable=not progress)
    src = p = None
    chosen: dict[float, float] = {}  # FLOPs reduction -> ratio, for the current plan
    try:
        for i, (spec, method, value, out) in enumerate(jobs):
            if i and spec != jobs[i - 1][0]:
                src = p = None  # one model in memory at a time
            elif i and method != jobs[i - 1][1]:
                p = None
            meta = _existing_meta(out)
            if meta is not None and _matches(meta, method, value, pattern, by_flops):
                rows.append(_kept_row(previous.get(out.name), spec, method, value, out, meta if by_flops else None))
                bar.update(1)
                continue
            start = time.perf_counter()
            if src is None:
                src = load_checked(spec, arch, "--flops-reductions" if by_flops else None)
            if p is None:
                p = plan(src.model if by_flops else src.state_dict, method=method, pattern=pattern)
                # every reduction of this model is searched now: one out of reach stops the sweep before its files
                chosen = {v: p.ratio_for_flops(v) for v in dict.fromkeys(j[2] for j in jobs if j[0] == spec)} if by_flops else {}
            ratio = chosen[value] if by_flops else value
            write_pruned(out, src, spec, p, method, ratio, value if by_flops else None, masks_only)
            row = _row(spec, method, ratio, p.sparsity(ratio), out, f"{time.perf_counter() - start:.2f}s")
            rows.append(_with_target(row, value, p.flops_reduction(ratio)) if by_flops else row)
            state = masks = None  # neither may outlive its model: the next one loads beside nothing
            _write_csv(out_dir / SUMMARY, rows)
            bar.update(1)
    except DimapError:
        bar.leave = False  # the refusal is the one line left on the terminal
        if made and not any(out_dir.iterdir()):
            out_dir.rmdir()  # refused before its first file: the sweep leaves nothing behind
        raise
    finally:
        bar.close()
    _write_csv(out_dir / SUMMARY, rows)
    print(format_rows(rows))
    return rows


def _no_architecture(spec: str) -> str:
    return f"--flops-reductions count FLOPs by running the architecture, and {spec} names none: pass --model NAME"


def _with_target(row: dict, target: float, achieved) -> dict:
    """A FLOPs sweep's row: the reduction asked for, then the ratio chosen and the reduction it gives."""
    achieved = _float(achieved)
    out = {"source": row["source"], "method": row["method"], "flops_target": target, "ratio": row["ratio"],
           "flops_reduction": round(achieved, 6) if achieved != "" else ""}
    out.update((k, v) for k, v in row.items() if k not in out)
    return out


def _stem(spec: str) -> str:
    return Path(spec).name.split(".")[0] if looks_like_path(spec) else spec


def _check(sources, ratios, methods, out_dir, arch, masks_only, pattern: Pattern, by_flops=False) -> list[tuple]:
    """Refuse bad input before any work or any file; returns (spec, method, ratio, output) per job.

    With ``by_flops`` the ratios are FLOPs reductions, and every source must name its architecture.
    """
    if by_flops:
        check_budget_pattern(pattern)
    if isinstance(sources, str) or not sources:
        raise DimapError("give the sources as a list of timm model names or checkpoint files")
    for spec in sources:
        if not isinstance(spec, str) or not spec:
            raise DimapError(f"a source is a timm model name or a checkpoint file, got {spec!r}")
    if not ratios:
        raise DimapError("give at least one FLOPs reduction, e.g. 0.3,0.5" if by_flops else "give at least one ratio, e.g. 0.15,0.35,0.55")
    if not methods:
        raise DimapError(f"give at least one method: {', '.join(METHODS)}")
    ratios = list(dict.fromkeys((check_reduction if by_flops else check_ratio)(r) for r in ratios))
    methods = list(dict.fromkeys(methods))
    for m in methods:
        check_choice("method", m, METHODS)
    fixed = pattern.fraction
    if fixed is not None and not by_flops and any(r != fixed for r in ratios):
        raise DimapError(f"pattern {pattern.name!r} always removes {'half' if fixed == 0.5 else f'{fixed:g}'} of the weights: "
                         f"use --ratios {fixed:g}")
    if arch is not None:
        check_model_name(arch)
    if out_dir.exists() and not out_dir.is_dir():
        raise DimapError(f"--out-dir {out_dir} is a file: name a folder")
    stems: dict[str, str] = {}
    for spec in dict.fromkeys(sources):
        if looks_like_path(spec):
            meta = {}
            if Path(spec).suffix == ".safetensors":  # header only: cheap, and it catches damage and misfits now
                shapes, meta = safetensors_header(spec)
                if (arch or meta.get("timm_model")) and not is_shrunk(meta):
                    check_architecture({k: v for k, v in shapes.items() if not k.startswith(MASK_PREFIX)},
                                       arch or meta["timm_model"], spec)
            else:
                checkpoint_path(spec)  # exists, readable, a known type; the rest is checked when it is loaded
            if by_flops and not (arch or meta.get("timm_model") or meta.get("model_config") or meta.get("config")):
                raise DimapError(_no_architecture(spec))
        else:
            check_model_name(spec)
        stem = _stem(spec)
        if stem in stems:
            raise DimapError(f"{stems[stem]} and {spec} would write the same outputs ({stem}__...): rename one of them")
        stems[stem] = spec
    jobs, names = [], {}
    for spec in stems.values():
        for method in methods:
            for ratio in ratios:
                out = out_dir / output_name(_stem(spec), method, ratio, masks_only, pattern, by_flops)
                if out_dir.is_dir():  # otherwise it is made later, and nothing in it can be an input
                    check_output(out, [spec] if looks_like_path(spec) else [])
                if out.name in names and names[out.name] != ratio:
                    kind = "FLOPs reductions" if by_flops else "ratios"
                    raise DimapError(f"{kind} {names[out.name]!r} and {ratio!r} give the same output {out.name}: "
                                     "drop one or make them differ in the first 6 digits")
                names[out.name] = ratio
                _check_existing(out, method, ratio, pattern, by_flops)
                jobs.append((spec, method, ratio, out))
    return jobs


def _existing_meta(out: Path) -> dict | None:
    """The metadata of an existing output, or None when there is none or it cannot be read."""
    if not out.is_file():
        return None
    try:
        return safetensors_header(out)[1]
    except DimapError:
        return None  # damaged (never by us: we rename complete files only); written again


def _check_existing(out: Path, method, ratio, pattern: Pattern, by_flops=False) -> None:
    meta = _existing_meta(out)
    if meta is not None and not _matches(meta, method, ratio, pattern, by_flops):
        raise DimapError(
            f"{out} exists but was not written by this sweep (method {meta.get('method')!r}, ratio {meta.get('ratio')!r}): "
            "move it away or choose another --out-dir"
        )


def _matches(meta, method, ratio, pattern: Pattern, by_flops=False) -> bool:
    """``ratio`` is the FLOPs reduction when ``by_flops``: the file records it beside the ratio chosen.
    Outputs of 0.1 record block_size 32 whatever the pattern: only block's is compared."""
    asked = meta.get("flops_reduction_target") if by_flops else meta.get("ratio")
    recorded = {"pattern": meta.get("pattern", "unstructured")}
    if pattern.kind == "block":
        recorded["block_size"] = meta.get("block_size", "")
    return (meta.get("format") == "dimap-fast/1" and meta.get("method") == method and asked == repr(ratio)
            and recorded == pattern.metadata())


def _read_summary(path: Path) -> dict[str, dict]:
    """Rows of a previous summary.csv by output file name; unreadable or absent gives none."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    return {Path(r["output"]).name: r for r in rows if r.get("output")}


def _kept_row(old, spec, method, ratio, out, flops_meta=None):
    """The row of an output that exists; its module columns come back from the old summary.csv.

    In a FLOPs sweep ``ratio`` is the reduction asked for and ``flops_meta`` the file's metadata,
    which holds the ratio chosen and the reduction reached.
    """
    row, key = {"source": spec, "method": method, "ratio": ratio}, "ratio"
    if flops_meta is not None:
        row = _with_target({**row, "ratio": _float(flops_meta.get("ratio"))}, ratio, flops_meta.get("flops_reduction"))
        key = "flops_target"
    if old is not None and old.get("method") == method and _float(old.get(key)) == ratio:
        for name, value in old.items():
            if name.endswith("-M") and value not in (None, ""):
                try:
                    row[name] = float(value)
                except ValueError:
                    pass
    row["output"] = str(out)
    row["note"] = "kept (exists)"
    return row


def _float(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return ""


def _row(spec, method, ratio, sparsity, out, note):
    row = {"source": spec, "method": method, "ratio": ratio}
    if sparsity is not None:
        for module, value in sparsity["modules"].items():
            row[module] = round(value, 6)
    row["output"] = str(out)
    row["note"] = note
    return row


def _write_csv(path: Path, rows: list[dict]) -> None:
    fields = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, buf.getvalue())


def format_rows(rows: list[dict]) -> str:
    modules = [k for r in rows for k in r if k.endswith("-M")]
    modules = list(dict.fromkeys(modules))
    by_flops = any("flops_target" in r for r in rows)
    cut = f"{'target':>7}{'ratio':>10}{'FLOPs':>8}" if by_flops else f"{'ratio':>6}"
    head = f"{'source':<36}{'method':<9}{cut}" + "".join(f"{m:>8}" for m in modules) + "  note"
    lines = [head]
    for r in rows:
        cells = "".join(f"{r[m]:>8.1%}" if m in r else f"{'-':>8}" for m in modules)
        if by_flops:
            cut = f"{r['flops_target']:>7.1%}{_cell(r['ratio'], '.6f', 10)}{_cell(r['flops_reduction'], '.1%', 8)}"
        else:
            cut = f"{r['ratio']:>6g}"
        lines.append(f"{r['source'][-36:]:<36}{r['method']:<9}{cut}{cells}  {r['note']}")
    return "\n".join(lines)


def _cell(value, spec: str, width: int) -> str:
    value = _float(value)
    return f"{value:>{width}{spec}}" if value != "" else f"{'-':>{width}}"
