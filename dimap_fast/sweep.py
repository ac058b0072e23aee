"""Batch pruning: several models x methods x ratios, one output file per triple.

One model and one plan are alive at a time, so memory stays that of the largest model plus its
plan. Each output is written atomically and summary.csv is rewritten (atomically) after every
file, so a sweep stopped at any point leaves only complete files; a rerun skips what exists.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import time
from pathlib import Path

from .errors import DimapError
from .io import check_output, looks_like_path, public_mode, save_pruned


def output_name(stem: str, method: str, ratio: float, masks_only: bool, pattern: str = "unstructured", block_size: int = 32) -> str:
    kind = "masks" if masks_only else "pruned"
    tag = {"unstructured": "", "block": f"__block{block_size}", "channel": "__channel", "2:4": "__2of4"}[pattern]
    return f"{stem}__{method}{tag}__r{ratio:g}.{kind}.safetensors"


def sweep(sources, ratios, methods, out_dir: Path, arch=None, masks_only=False, progress=True,
          pattern: str = "unstructured", block_size: int = 32) -> list[dict]:
    """Prune every source at every ratio with every method; returns the summary rows."""
    from tqdm import tqdm

    from .cli import prune_state
    from .plan import plan
    from .sources import load_source

    out_dir = Path(out_dir)
    from .patterns import check_pattern

    check_pattern(pattern, block_size)
    if pattern == "2:4" and any(r != 0.5 for r in ratios):
        raise DimapError("pattern '2:4' always removes half of the weights: use --ratios 0.5")
    for spec in sources:  # refuse bad names before any work or any file
        if looks_like_path(spec):
            if not Path(spec).is_file():
                raise DimapError(f"checkpoint {spec} not found: check the path")
        else:
            _check_name(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    bar = tqdm(total=len(sources) * len(methods) * len(ratios), desc="sweep", unit="file", disable=not progress)
    try:
        for spec in sources:
            src = load_source(spec, arch=arch)
            for method in methods:
                p = None
                for ratio in ratios:
                    out = check_output(out_dir / output_name(src.stem, method, ratio, masks_only, pattern, block_size), [src.path])
                    if out.exists():
                        rows.append(_row(spec, method, ratio, None, out, "kept (exists)"))
                        bar.update(1)
                        continue
                    start = time.perf_counter()
                    if p is None:
                        p = plan(src.state_dict, method=method, pattern=pattern, block_size=block_size)
                    masks = p.masks(ratio)
                    meta = {"method": method, "ratio": repr(ratio), "source": spec, "timm_model": src.arch or "",
                            "pattern": pattern, "block_size": str(block_size)}
                    state = {} if masks_only else prune_state(src.state_dict, masks)
                    save_pruned(out, state, masks, meta)
                    rows.append(_row(spec, method, ratio, p.sparsity(ratio), out, f"{time.perf_counter() - start:.2f}s"))
                    _write_csv(out_dir / "summary.csv", rows)
                    bar.update(1)
                del p
            del src
    finally:
        bar.close()
    _write_csv(out_dir / "summary.csv", rows)
    print(format_rows(rows))
    return rows


def _check_name(spec):
    import timm

    if not timm.is_model(spec):
        raise DimapError(f"unknown model name {spec!r}: see timm.list_models('swin*')")


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
    fd, tmp = tempfile.mkstemp(prefix=".summary.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w", newline="") as f:
        f.write(buf.getvalue())
    os.chmod(tmp, public_mode())
    os.replace(tmp, path)


def format_rows(rows: list[dict]) -> str:
    modules = [k for r in rows for k in r if k.endswith("-M")]
    modules = list(dict.fromkeys(modules))
    head = f"{'source':<36}{'method':<9}{'ratio':>6}" + "".join(f"{m:>8}" for m in modules) + "  note"
    lines = [head]
    for r in rows:
        cells = "".join(f"{r[m]:>8.1%}" if m in r else f"{'-':>8}" for m in modules)
        lines.append(f"{r['source'][-36:]:<36}{r['method']:<9}{r['ratio']:>6g}{cells}  {r['note']}")
    return "\n".join(lines)
