"""Your own model, sparsified and trained: a small CNN on the 8x8 digits that ship with spafl.

    python examples/own_model.py [--epochs 8]

`spafl.sparsify` turns the CNN's Conv2d and Linear layers into threshold layers in place (same
function: thresholds start at 0). Training adds SpaFL's penalty `th_coeff * sum exp(-tau)` to the
loss and lets SGD move the weights and the thresholds; units whose mean |w| falls to their
threshold are pruned and then cost nothing on the CPU backend. Prints the density and the test
accuracy after every epoch.
"""

import argparse

import torch
from torch import nn

import spafl
from spafl.datasets import load_digits


def small_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10),
    )


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--th-coeff", type=float, default=0.002, help="weight of the threshold penalty")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # small layers: one intra-op thread is the fastest (docs/getting-started.md)
    torch.manual_seed(0)

    images, labels = load_digits()  # [1797, 8, 8] in [0, 1], no download
    x = images.unsqueeze(1)
    order = torch.randperm(len(labels))
    test, train = order[:360], order[360:]
    x = (x - x[train].mean()) / x[train].std()

    model = spafl.sparsify(small_cnn(), exclude=("8",))  # the classifier stays dense
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)  # built after sparsify: thresholds too
    for epoch in range(1, args.epochs + 1):
        model.train()
        for idx in train[torch.randperm(len(train))].split(32):
            loss = nn.functional.cross_entropy(model(x[idx]), labels[idx])
            opt.zero_grad()
            (loss + args.th_coeff * spafl.threshold_penalty(model)).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x[test]).argmax(1) == labels[test]).float().mean().item()
        density = spafl.model_density(model)
        layers = " ".join(f"{name} {d:.2f}" for name, d in density["layers"].items())
        print(f"epoch {epoch}: test accuracy {accuracy:.1%}, density {density['mean']:.3f} "
              f"(weighted {density['weighted']:.3f}; {layers})")
    return {"accuracy": accuracy, "density": density["mean"]}


if __name__ == "__main__":
    main()
