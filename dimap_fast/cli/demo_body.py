"""``dimap-fast demo``: a small Swin trained on scikit-learn's digits, pruned three ways.

The model ships in the package (dimap_fast/assets, made by scripts/make_demo_model.py), so the demo
runs offline in seconds: accuracy before and after pruning for dimap, global and uniform, the
per-module sparsity, and the pruned checkpoint written to disk.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..engine.flops import format_report, report
from ..engine.masks import masked_copy
from ..engine.plan import plan
from ..engine.values import METHODS
from ..io.checkpoint import save_pruned

def run_demo(out_dir: Path, ratios=(0.5, 0.8)) -> dict:
    from ..train import digits_datasets, evaluate, load_demo_model

    model, meta = load_demo_model()
    config = meta["config"]
    data = meta.get("data", {})
    _, val = digits_datasets(image_size=int(data.get("image_size", config.get("img_size", 32))), seed=int(data.get("seed", 0)))
    dense = evaluate(model, val)["top1"]
    print(f"small Swin on scikit-learn digits: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"{len(val)} validation images, dense accuracy {dense:.2%}\n")

    results = {}
    plans = {m: plan(model, method=m) for m in METHODS}
    for m, p in plans.items():
        for r in ratios:
            results[(m, r)] = evaluate(masked_copy(model, p.masks(r)), val)["top1"]
    print("top-1 accuracy after one-shot pruning (no fine-tuning)")
    print(f"{'method':<10}" + "".join(f"{f'{r:.0%} pruned':>14}" for r in ratios))
    for m in METHODS:
        print(f"{m:<10}" + "".join(f"{results[(m, r)]:>14.2%}" for r in ratios))
    print(f"{'dense':<10}{dense:>14.2%}\n")

    for r in ratios:
        pruned = masked_copy(model, plans["dimap"].masks(r))
        print(f"dimap at {r:.0%}: per-module sparsity")
        print(format_report(report(pruned)) + "\n")
        kept = [f"{1 - v:.0%}" for v in plans["dimap"].sparsity(r)["layers"].values()]
        print("kept per layer, in name order: " + " ".join(kept) + "\n")

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    r = ratios[0]
    masks = plans["dimap"].masks(r)
    path = save_pruned(
        out_dir / f"digits_swin_dimap_r{r:g}.safetensors",
        masked_copy(model, masks).state_dict(),
        masks,
        {"method": "dimap", "ratio": repr(r), "source": "demo", "model_config": json.dumps(config)},
    )
    print(f"wrote {path}  (inspect it: dimap-fast report {path} --layers)")
    return {"dense": dense, **{f"{m}@{r}": v for (m, r), v in results.items()}}
