"""Files in and out: checkpoint formats and safetensors headers (checkpoint.py); models built and
loaded from names, checkpoints and shrunk files, and shrunk models saved (models.py); the shipped
demo model (demo_model.py). Imports the engine, arch and shrink; nothing above them."""
