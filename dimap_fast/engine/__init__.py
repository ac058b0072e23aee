"""The engine: what is prunable (prunable.py), the pruning values (values.py) and units (units.py),
the scores (scores.py on the CPU, triton_scores.py on the GPU), the plan and its cutoffs
(plan.py), the FLOPs count and budget (flops.py, budget.py), and the masks with their guard
(masks.py). Imports arch/ and errors; nothing above it.

Import the modules themselves (``from dimap_fast.engine import plan``): this package re-exports
nothing, so ``dimap_fast.engine.plan`` is always the module.
"""
