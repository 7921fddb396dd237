"""The settings of a threshold layer as one frozen value.

A layer builds its :class:`ThresholdOptions` once (in ``__init__``, and again when a setting is
assigned), the functional API once per distinct set of keyword arguments (cached); from there
the options travel as one value to the dispatch (:func:`spafl._checks.route`), the autograd
Functions and the ``torch.library`` operators (as the string of :meth:`ThresholdOptions.key`,
which operators can carry). Adding an option touches this class and the code that reads it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

BACKENDS = ("auto", "compact", "reference", "triton")
COLLAPSE_TIMINGS = ("current", "previous")
BACKWARD_MODES = ("exact", "skip", "sample")


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ThresholdOptions:
    """How a threshold layer computes (validated at construction; see
    :func:`spafl.threshold_linear` for the meaning of each field).

    ``collapse_density`` is the guard of this call: a layer in eval mode without
    ``collapse_in_eval`` passes options with None (:meth:`without_guard`)."""

    backend: str = "auto"
    backward_mode: str = "exact"
    sample_fraction: float = 0.125
    collapse_density: float | None = None
    collapse_timing: str = "current"
    skip_zero_inputs: bool = False
    check_finite: bool | None = None

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if self.backward_mode not in BACKWARD_MODES:
            raise ValueError(f"backward_mode must be one of {BACKWARD_MODES}, got {self.backward_mode!r}")
        fraction = self.sample_fraction
        if not _is_number(fraction) or not 0.0 < float(fraction) <= 1.0:
            raise ValueError(f"sample_fraction must be in (0, 1], got {fraction!r}")
        density = self.collapse_density
        if density is not None and (not _is_number(density) or not 0.0 <= float(density) < 1.0):
            raise ValueError(f"collapse_density must be None or in [0, 1), got {density!r}")
        if self.collapse_timing not in COLLAPSE_TIMINGS:
            raise ValueError(f"collapse_timing must be one of {COLLAPSE_TIMINGS}, got {self.collapse_timing!r}")
        if not isinstance(self.skip_zero_inputs, bool):
            raise TypeError(f"skip_zero_inputs must be a bool, got {self.skip_zero_inputs!r}")
        if self.check_finite is not None and not isinstance(self.check_finite, bool):
            raise TypeError(f"check_finite must be None or a bool, got {self.check_finite!r}")
        object.__setattr__(self, "sample_fraction", float(fraction))
        if density is not None:
            object.__setattr__(self, "collapse_density", float(density))
        # A string that from_key turns back into these options: how the torch.library operators,
        # which take no Python objects, receive them. (A plain attribute, not a cached property:
        # dynamo reads it while it traces.)
        object.__setattr__(self, "key", repr(tuple(getattr(self, f.name) for f in dataclasses.fields(self))))

    def replace(self, **changes) -> ThresholdOptions:
        """A copy with ``changes`` (validated)."""
        return dataclasses.replace(self, **changes)

    def without_guard(self) -> ThresholdOptions:
        """These options with the collapse guard off (eval-mode forwards)."""
        return self if self.collapse_density is None else self.replace(collapse_density=None)


@functools.lru_cache(maxsize=256)
def from_key(key: str) -> ThresholdOptions:
    """The options whose :attr:`ThresholdOptions.key` is ``key``."""
    import ast

    return ThresholdOptions(*ast.literal_eval(key))


def options_of(backend, backward_mode, sample_fraction, collapse_density, collapse_timing, skip_zero_inputs,
               check_finite) -> ThresholdOptions:
    """The options of a functional call, built and validated once per distinct set of arguments.
    The types are part of the key: ``1``, ``1.0`` and ``True`` hash alike and validate differently."""
    args = (backend, backward_mode, sample_fraction, collapse_density, collapse_timing, skip_zero_inputs,
            check_finite)
    try:
        key = (args, tuple(map(type, args)))
        found = _OPTIONS.get(key)
    except TypeError:  # an unhashable argument: the constructor names it
        return ThresholdOptions(*args)
    if found is None:
        if len(_OPTIONS) > 1024:  # (a caller sweeping a float option should not grow it forever)
            _OPTIONS.clear()
        found = _OPTIONS[key] = ThresholdOptions(*args)
    return found


# (a dict rather than functools.lru_cache: dynamo traces through it without a warning)
_OPTIONS: dict[tuple, ThresholdOptions] = {}
