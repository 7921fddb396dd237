"""Local-only training: each client trains its own dense model on its own data; nothing is
sent, nothing is aggregated (the baseline that shows what federation adds)."""

from __future__ import annotations

from .base import Method


class LocalOnly(Method):
    name = "local"
    communicates = False
    cohort_clip = 20.0  # unused (nothing is exchanged): the earlier default, so its checkpoints resume


