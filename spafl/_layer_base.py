"""What both threshold layers share (:class:`spafl.ThresholdLinear`, :class:`spafl.ThresholdConv2d`):
the options and the collapse guard's buffers, the mask that a fused optimizer step keeps for the
next forward (and what invalidates it), conversion from and to the dense layers, the mask and
density properties. The layers themselves are in :mod:`spafl.layers`.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from ._guard import HostMaskCache
from ._options import ThresholdOptions
from .functional import threshold_row_mask

# weight Parameter -> weakref of the threshold layer that last ran a forward with it: how a fused
# optimizer (spafl.optim), which only sees parameters, finds the layer whose next mask it builds.
# (keyed by identity: tensors compare elementwise)
_WEIGHT_OWNERS = WeakIdKeyDictionary()


def weight_owner(weight: torch.Tensor):
    """The threshold layer whose forward last ran with ``weight`` (None if none is alive)."""
    ref = _WEIGHT_OWNERS.get(weight)
    return None if ref is None else ref()


def _guard_buffers(device) -> dict[str, torch.Tensor]:
    """The fresh collapse-guard buffers of a threshold layer on ``device``."""
    return {
        # Number of times the collapse guard reset this layer's thresholds; a buffer so that it
        # lives on the device (incremented without a host sync) and is saved with checkpoints.
        "collapse_resets": torch.zeros((), dtype=torch.long, device=device),
        # Density of the last forward in which the guard ran (1 before any): what
        # collapse_timing="previous" tests, like the authors' `self.ratio`. Saved with checkpoints.
        "previous_density": torch.ones((), dtype=torch.float32, device=device),
    }


_UNSAVED = ("_next_mask", "_registered_weight", "_host_mask_cache", "_device_call")


class _ThresholdMixin:
    """Mask / density / collapse-guard state shared by the threshold layers.

    Expects ``self.weight [out, ...]``, ``self.threshold [out]`` and the options set by
    :meth:`_init_threshold_state`.
    """

    # Version 2 added the `previous_density` buffer (see _load_from_state_dict).
    _version = 2

    def _init_threshold_state(self, backend, backward_mode, sample_fraction, collapse_density, collapse_timing,
                              collapse_in_eval, skip_zero_inputs, check_finite, device):
        if not isinstance(collapse_in_eval, bool):
            raise TypeError(f"collapse_in_eval must be a bool, got {collapse_in_eval!r}")
        self._set_options(ThresholdOptions(backend, backward_mode, sample_fraction, collapse_density, collapse_timing,
                                           skip_zero_inputs, check_finite), collapse_in_eval)
        for name, value in _guard_buffers(device).items():
            self.register_buffer(name, value)

    def _set_options(self, options: ThresholdOptions, collapse_in_eval: bool) -> None:
        # The options of a training-mode and of an eval-mode forward, built once here.
        if not isinstance(options, ThresholdOptions):
            raise TypeError(f"options must be a spafl ThresholdOptions, got {type(options).__name__}")
        self.__dict__["_options"] = options
        self.__dict__["_collapse_in_eval"] = collapse_in_eval
        self.__dict__["_eval_options"] = options if collapse_in_eval else options.without_guard()

    @property
    def options(self) -> ThresholdOptions:
        """The layer's settings (frozen; assigning a setting of the layer, e.g.
        ``layer.backward_mode = "skip"``, or a whole new value here, replaces it)."""
        return self._options

    @options.setter
    def options(self, value: ThresholdOptions) -> None:
        self._set_options(value, self._collapse_in_eval)

    @property
    def collapse_in_eval(self) -> bool:
        return self._collapse_in_eval

    @collapse_in_eval.setter
    def collapse_in_eval(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"collapse_in_eval must be a bool, got {value!r}")
        self._set_options(self._options, value)

    @property
    def forward_options(self) -> ThresholdOptions:
        """The options of the next forward: :attr:`options`, without the guard in eval mode
        unless ``collapse_in_eval``."""
        return self._options if self.training else self._eval_options

    def keep_next_mask(self, mask_backend: str, row_mask) -> None:
        """Keep ``row_mask`` (computed by ``mask_backend`` from the current weight and thresholds,
        with the training options' guard density) for the next forward, which uses it while the
        weight and the thresholds stay as they are now (their version counters and storage)."""
        self.__dict__["_next_mask"] = (self._mask_key(self._options), (mask_backend, row_mask))

    def forget_next_mask(self) -> None:
        """Drop the kept masks (a fused optimizer's, and the last forward's on the CPU): the next
        forward scores the weight itself. Needed only after writing the weight or the thresholds
        in a way that PyTorch's version counters do not see (in place through ``.data``, through
        a NumPy array sharing their memory): see :class:`spafl._guard.HostMaskCache`."""
        self.__dict__.pop("_next_mask", None)
        self.__dict__.pop("_device_call", None)
        cache = self.__dict__.get("_host_mask_cache")
        if cache is not None:
            cache.clear()

    def _host_masks(self) -> HostMaskCache:
        """The cache of the last forward's mask on the host path (see :class:`HostMaskCache`)."""
        cache = self.__dict__.get("_host_mask_cache")
        if cache is None:
            cache = self.__dict__["_host_mask_cache"] = HostMaskCache()
        return cache

    def _apply(self, fn, *args, **kwargs):
        # (.to(), .half(), .cuda() ...: the kept masks belong to the old tensors, whose storage the
        # host cache would otherwise hold)
        self.forget_next_mask()
        return super()._apply(fn, *args, **kwargs)

    def _mask_key(self, options: ThresholdOptions) -> tuple:
        w, tau = self.weight, self.threshold
        key = (id(w), w._version, w.data_ptr(), id(tau), tau._version, tau.data_ptr(), options.collapse_density)
        if options.collapse_density is not None and options.collapse_timing == "previous":
            # (that guard tests the density stored by the last guarded forward)
            prev = self.previous_density
            key += (id(prev), prev._version, prev.data_ptr())
        return key

    def _kept_mask(self, options: ThresholdOptions):
        """The kept ``(mask backend, RowMask)`` if still current for a forward with ``options``."""
        kept = self.__dict__.get("_next_mask")
        if kept is None:
            return None
        # (kept on a mismatch: an eval-mode forward, whose options differ, leaves it current)
        return kept[1] if kept[0] == self._mask_key(options) else None

    def _eager_masks(self, options: ThresholdOptions) -> tuple:
        """A forward's registration with the fused optimizers, and its ``(kept mask, host mask
        cache)``: ``(None, None)`` while ``torch.compile`` traces (the compiled graph builds its
        own mask)."""
        if torch.compiler.is_compiling():
            return None, None
        self._register_owner()
        return self._kept_mask(options), self._host_masks()

    def _call_tensors(self) -> tuple:
        """``(weight, threshold, bias, collapse_resets, previous_density)`` for a forward."""
        params, buffers = self._parameters, self._buffers
        try:  # (straight from the module's dictionaries: five attribute lookups cost ~5 us)
            return (params["weight"], params["threshold"], params["bias"], buffers["collapse_resets"],
                    buffers["previous_density"])
        except KeyError:  # a parametrization (torch.nn.utils.parametrize) computes one of them
            return self.weight, self.threshold, self.bias, self.collapse_resets, self.previous_density

    def _register_owner(self) -> None:
        # (a forward registers the layer, so that a fused optimizer finds it from its weight; the
        # weak reference to the weight registered last spares the dictionary's lookup, which costs
        # microseconds a call)
        weight = self.weight
        registered = self.__dict__.get("_registered_weight")
        if registered is not None and registered() is weight:
            return
        ref = _WEIGHT_OWNERS.get(weight)
        if ref is None or ref() is not self:
            _WEIGHT_OWNERS[weight] = weakref.ref(self)
        self.__dict__["_registered_weight"] = weakref.ref(weight)

    def __getstate__(self):
        # (a kept mask is a cache tied to this process's tensors, and a weak reference cannot be
        # pickled: none is saved)
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        if any(k in state for k in _UNSAVED):
            state = {k: v for k, v in state.items() if k not in _UNSAVED}
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # Checkpoints written before `previous_density` existed load with the fresh value (1).
        key = prefix + "previous_density"
        if local_metadata.get("version", 1) < 2 and key not in state_dict:
            state_dict[key] = self.previous_density.detach().clone()
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _init_parameters(self, weight_shape: tuple[int, ...], bias: bool, factory: dict) -> None:
        out = weight_shape[0]
        self.weight = nn.Parameter(torch.empty(weight_shape, **factory))
        self.threshold = nn.Parameter(torch.empty(out, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(out, **factory))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def _from_dense(cls, dense: nn.Module, copy: bool, args: tuple, kwargs: dict):
        """``from_dense``: ``cls(*args, **kwargs)`` with ``dense``'s weight and bias (copied, or
        ``dense``'s Parameter objects themselves with ``copy=False``)."""
        if not isinstance(copy, bool):
            raise TypeError(f"copy must be a bool, got {copy!r}")
        if isinstance(dense, nn.modules.lazy.LazyModuleMixin) and dense.has_uninitialized_params():
            raise ValueError(f"from_dense: the {type(dense).__name__} is not initialised yet; run a forward first")
        for name in ("device", "dtype"):
            if name in kwargs:
                raise TypeError(f"from_dense takes the {name} of the dense layer's weight; got {name}={kwargs[name]!r}")
        factory = {"device": dense.weight.device, "dtype": dense.weight.dtype}
        if copy:
            return cls(*args, **kwargs, **factory)._copy_from(dense)
        for name in ("weight", "bias"):
            value = getattr(dense, name)
            if value is not None and not isinstance(value, nn.Parameter):
                raise ValueError(
                    f"from_dense(copy=False) takes the dense layer's Parameters, but its {name} is a "
                    f"{type(value).__name__} computed from others (by weight normalisation or torch.nn.utils.prune?); "
                    "remove that first, or copy"
                )
        # Built on the meta device: the weight and bias are replaced by dense's, the thresholds
        # and buffers made on its device (no allocation and no random draws for the initialisation).
        layer = cls(*args, **kwargs, device="meta", dtype=factory["dtype"])
        layer.weight = dense.weight
        layer.bias = dense.bias
        layer.threshold = nn.Parameter(torch.zeros(layer.weight.shape[0], **factory))
        for name, value in _guard_buffers(factory["device"]).items():
            setattr(layer, name, value)
        return layer.train(dense.training)

    def _copy_from(self, dense: nn.Module):
        """Copy ``dense``'s weight and bias (values, memory format, requires_grad, train mode)."""
        with torch.no_grad():
            self.weight.data = torch.empty_like(dense.weight).copy_(dense.weight)
            if dense.bias is not None:
                self.bias.copy_(dense.bias)
        self.weight.requires_grad_(dense.weight.requires_grad)
        if dense.bias is not None:
            self.bias.requires_grad_(dense.bias.requires_grad)
        self.train(dense.training)
        return self

    @property
    def mask(self) -> torch.Tensor:
        """bool ``[out]``: units active under the current weights and thresholds (no guard)."""
        rm = threshold_row_mask(self.weight, self.threshold, backend=self.backend, check_finite=self.check_finite)
        return rm.mask

    @property
    def density(self) -> float:
        """Fraction of active output units (synchronises with the device)."""
        if self.weight.device.type == "meta":
            raise ValueError("density needs the weights' values, and this layer is on the meta device")
        return float(self.mask.float().mean())

    def _finish_dense(self, dense: nn.Module) -> nn.Module:
        """``to_dense``'s layer takes this one's train mode and ``requires_grad`` flags."""
        dense.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            dense.bias.requires_grad_(self.bias.requires_grad)
        return dense.train(self.training)

    def _flags_repr(self) -> str:
        """The options that differ from the defaults (the sample fraction in ``sample`` mode)."""
        flags = [f"sample_fraction={self.sample_fraction}"] if self.backward_mode == "sample" else []
        if self.collapse_density != 0.01:
            flags.append(f"collapse_density={self.collapse_density}")
        if self.collapse_timing != "current":
            flags.append(f"collapse_timing={self.collapse_timing!r}")
        flags += [name + "=True" for name in ("collapse_in_eval", "skip_zero_inputs") if getattr(self, name)]
        if self.check_finite is not None:
            flags.append(f"check_finite={self.check_finite}")
        return "".join(", " + f for f in flags)

    def _density_repr(self) -> str:
        try:
            return f"density={self.density:.3f}"
        except Exception:  # e.g. meta tensors: the repr must not fail
            return "density=?"


# Each setting of ThresholdOptions reads and writes through the layer's options object (a
# write builds and validates new options), so that a layer's settings are attributes as on
# nn.Linear and one value for the code that runs them.
for _name in ThresholdOptions.__dataclass_fields__:
    setattr(_ThresholdMixin, _name, property(
        lambda self, _n=_name: getattr(self._options, _n),
        lambda self, value, _n=_name: self._set_options(self._options.replace(**{_n: value}), self._collapse_in_eval),
        doc=f"``options.{_name}`` (assigning it replaces the options)."))
del _name
