"""``datasets.FashionMNIST``: the raw IDX files under ``<root>/FashionMNIST/raw`` (torchvision's
layout, ``.gz`` or not), read with spafl's reader, exposed as torchvision exposes them:
``.data`` uint8 ``[n, 28, 28]``, ``.targets`` int64 ``[n]``, ``(image, target)`` items."""

from __future__ import annotations

from pathlib import Path

from spafl.federated.datafiles import read_fashion_mnist


class FashionMNIST:
    classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
               "Ankle boot"]

    def __init__(self, root, train: bool = True, transform=None, target_transform=None, download: bool = False):
        self.root, self.train = str(root), bool(train)
        self.transform, self.target_transform = transform, target_transform
        raw = Path(root) / "FashionMNIST" / "raw"
        if not raw.is_dir():
            hint = " (this stand-in cannot download)" if download else ""
            raise RuntimeError(f"Fashion-MNIST not found: expected the raw IDX files in {raw}{hint}")
        dataset = read_fashion_mnist(root)
        x, y = (dataset.train_x, dataset.train_y) if self.train else (dataset.test_x, dataset.test_y)
        self.data = x.reshape(x.shape[0], x.shape[-2], x.shape[-1]).contiguous()  # [n, 1, 28, 28] -> [n, 28, 28]
        self.targets = y

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, index: int):
        image, target = self.data[index], int(self.targets[index])
        if self.transform is not None:
            image = self.transform(image.numpy())
        if self.target_transform is not None:
            target = self.target_transform(target)
        return image, target


__all__ = ["FashionMNIST"]
