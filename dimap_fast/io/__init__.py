"""Files in and out: checkpoint formats, atomic writes and safetensors headers (checkpoint.py);
models built and loaded from names, checkpoints and shrunk files (loading.py). Imports the engine
and arch/; nothing above it."""
