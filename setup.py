from pathlib import Path

from setuptools import setup

setup(
    name="spafl",
    version="0.1.0",
    description="SpaFL: trainable-threshold structured sparsity with Triton kernels that skip pruned units",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    # `kernels/` is installed as `spafl.kernels`, never as a top-level `kernels` module
    # (that name belongs to an unrelated PyPI distribution).
    packages=["spafl", "spafl.federated", "spafl.kernels"],
    package_dir={"spafl": "spafl", "spafl.kernels": "kernels"},
    package_data={"spafl": ["data/*.npz", "data/*.md"]},
    install_requires=["torch>=2.4", "numpy>=1.24"],
    extras_require={
        # Triton ships for Linux x86-64/aarch64; the reference path runs without it.
        "triton": ["triton>=3.0"],
        "vision": ["torchvision"],
        # Plots of federated runs (spafl plot, spafl train --plot).
        "plot": ["matplotlib>=3.5"],
        "test": ["triton>=3.0", "pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.5"],
        "dev": ["triton>=3.0", "pytest>=7", "pytest-benchmark>=4", "matplotlib>=3.5", "ruff"],
    },
    entry_points={"console_scripts": ["spafl=spafl.cli:main"]},
)
