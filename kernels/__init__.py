"""Triton kernels for DIMAP scoring, threshold selection and mask application, with references.

Importing this package never needs triton or a GPU: without triton the kernels refuse to run
(RuntimeError) while the ``*_reference`` functions keep working.
"""

from ._common import HAVE_TRITON
from .apply import apply_cutoffs, apply_cutoffs_reference
from .importance import module_scores, module_scores_reference
from .select import select_keep_counts, select_keep_counts_reference

__all__ = [
    "HAVE_TRITON",
    "apply_cutoffs",
    "apply_cutoffs_reference",
    "module_scores",
    "module_scores_reference",
    "select_keep_counts",
    "select_keep_counts_reference",
]
