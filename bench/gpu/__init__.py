"""The GPU check's parts: everything that needs a GPU, as one command (``python bench/gpu_check.py``;
``make gpu-check``). driver.py plans and runs the steps, each in its own process
(processes.py) and reports (report.py); context.py is what every step shares; steps.py, kernel_checks.py,
speed.py, attention.py and sparse.py are the steps; models.py the models they build; compiles.py the
Triton compiles each step needs (its budget)."""
