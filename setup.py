from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent

setup(
    name="dimap-fast",
    version="0.1.0",
    description="DIMAP pruning for timm's hierarchical vision transformers, with Triton kernels",
    long_description=(here / "README.md").read_text(encoding="utf-8") if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ ships inside the package: a top-level "kernels" would clash with PyPI's package of that name
    packages=[*find_packages(include=["dimap_fast", "dimap_fast.*"]), "dimap_fast.kernels"],
    package_dir={"dimap_fast": "dimap_fast", "dimap_fast.kernels": "kernels"},
    package_data={"dimap_fast": ["assets/*.safetensors"]},
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "timm>=1.0,<1.1",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "numpy>=1.26",
        "scikit-learn>=1.3",  # the demo's data: the handwritten digits that ship inside it
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-benchmark>=4", "hypothesis>=6.100", "matplotlib>=3.7", "transformers>=4.40"],
        "hf": ["transformers>=4.40"],  # prune Hugging Face Swin / Swinv2 models
        "plot": ["matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["dimap-fast=dimap_fast.cli:entry"]},
)
