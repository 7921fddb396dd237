"""FedAvg: a dense model; the whole model (weights, batch-norm parameters and statistics) travels
both ways; the server averages the updates weighted by the clients' sample counts. Everything
is the base :class:`~.base.Method`'s: this module names it."""

from __future__ import annotations

from .base import Method


class FedAvg(Method):
    name = "fedavg"
    personalised = False


