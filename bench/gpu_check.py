"""Everything that needs a GPU, as one prepared command (``make gpu-check``):

    python bench/gpu_check.py [--out DIR] [--dry-run] [--wheels DIR] [--only STEP,...]

The steps, their budgets and the reports live in bench/gpu/ (driver.py says what each does).
"""

import sys

from gpu.driver import main  # this file's folder, bench/, is first on the path

if __name__ == "__main__":
    sys.exit(main())
