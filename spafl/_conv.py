"""Geometry of a 2-D convolution: options normalised once, shared by the reference, the kernels
and the layer."""

from __future__ import annotations

from dataclasses import dataclass


def _pair(name: str, value, *, minimum: int) -> tuple[int, int]:
    items = value if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2 or any(isinstance(v, bool) or not isinstance(v, int) for v in items):
        raise ValueError(f"{name} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in items):
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(items[0]), int(items[1])


@dataclass(frozen=True)
class ConvGeometry:
    """Stride, padding, dilation and groups of a convolution with a ``kernel`` (kh, kw).

    ``padding`` is what ``F.conv2d`` accepts (a pair of ints, ``"same"`` or ``"valid"``);
    ``pad_begin`` / ``pad_end`` are the explicit zero rows and columns added before (top, left)
    and after (bottom, right). They differ only for ``"same"`` with an odd total padding, where
    the extra row / column goes after, as in PyTorch.
    """

    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    pad_begin: tuple[int, int]
    pad_end: tuple[int, int]

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        out = []
        for size, k, s, d, p0, p1 in zip(
            (height, width), self.kernel, self.stride, self.dilation, self.pad_begin, self.pad_end, strict=True
        ):
            out.append((size + p0 + p1 - d * (k - 1) - 1) // s + 1)
        return out[0], out[1]

    @property
    def is_pointwise(self) -> bool:
        """A 1x1 convolution without stride, padding or groups: a GEMM over the pixels."""
        return (
            self.kernel == (1, 1)
            and self.stride == (1, 1)
            and self.pad_begin == (0, 0)
            and self.pad_end == (0, 0)
            and self.groups == 1
        )


def conv_geometry(kernel, stride=1, padding=0, dilation=1, groups=1) -> ConvGeometry:
    """Validate and normalise convolution options (the rules of ``torch.nn.Conv2d``)."""
    kernel = _pair("kernel_size", kernel, minimum=1)
    stride = _pair("stride", stride, minimum=1)
    dilation = _pair("dilation", dilation, minimum=1)
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive integer, got {groups!r}")
    if isinstance(padding, str):
        if padding not in ("same", "valid"):
            raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
        if padding == "same" and stride != (1, 1):
            raise ValueError(f"padding='same' is not supported for strided convolutions (stride={stride})")
        if padding == "valid":
            begin = end = (0, 0)
        else:
            total = [d * (k - 1) for k, d in zip(kernel, dilation, strict=True)]
            begin = (total[0] // 2, total[1] // 2)
            end = (total[0] - begin[0], total[1] - begin[1])
        spec = padding
    else:
        begin = end = spec = _pair("padding", padding, minimum=0)
    return ConvGeometry(kernel, stride, spec, dilation, groups, begin, end)


_GEOMETRIES: dict[tuple, ConvGeometry] = {}


def cached_geometry(kernel, stride=1, padding=0, dilation=1, groups=1) -> ConvGeometry:
    """:func:`conv_geometry`, built once per distinct set of options (a layer's options rarely
    change; its forward asks for them every call). The types are part of the key: ``1``,
    ``1.0`` and ``True`` hash alike and validate differently."""
    args = (kernel, stride, padding, dilation, groups)
    try:
        key = (args, tuple(map(type, args)))
        found = _GEOMETRIES.get(key)
    except TypeError:  # unhashable options (a list): validated without the cache
        return conv_geometry(*args)
    if found is None:
        found = _GEOMETRIES[key] = conv_geometry(*args)
    return found
