"""Packaging: the metadata is in ``pyproject.toml``; this maps the folders to packages."""

from setuptools import setup

setup(
    # `kernels/` is installed as `spafl.kernels`, never as a top-level `kernels` module
    # (that name belongs to an unrelated PyPI distribution).
    packages=["spafl", "spafl.federated", "spafl.federated.methods", "spafl.federated.runfolder", "spafl.flower",
              "spafl.kernels"],
    package_dir={"spafl": "spafl", "spafl.kernels": "kernels"},
    package_data={"spafl": ["data/*.npz", "data/*.md"]},
)
