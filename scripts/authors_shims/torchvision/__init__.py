"""A minimal stand-in for ``torchvision`` (which does not import on the project's CPU machines),
for running the SpaFL authors' FMNIST code: ``datasets.FashionMNIST`` and ``transforms.ToTensor``
only. Data plumbing, no part of the algorithm."""

from . import datasets, transforms

__version__ = "0+spafl.shim"
__all__ = ["datasets", "transforms"]
