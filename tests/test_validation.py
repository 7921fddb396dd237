"""Bad input fails fast with an error that names the problem."""

import pytest
import torch

from spafl import ThresholdLinear, threshold_linear, threshold_row_mask

W = torch.randn(4, 3)
TAU = torch.zeros(4)
X = torch.randn(2, 3)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"x": torch.randn(2, 5)}, ValueError, "5 features"),
        ({"x": torch.randn(())}, ValueError, "at least 1 dimension"),
        ({"weight": torch.randn(4, 3, 1)}, ValueError, "weight must be 2-D"),
        ({"weight": torch.randn(0, 3), "threshold": torch.zeros(0)}, ValueError, "must not be empty"),
        ({"threshold": torch.zeros(5)}, ValueError, r"threshold must have shape \(4,\)"),
        ({"threshold": torch.zeros(4, 1)}, ValueError, r"threshold must have shape \(4,\)"),
        ({"bias": torch.zeros(3)}, ValueError, r"bias must have shape \(4,\)"),
        ({"x": X.double()}, TypeError, "x is torch.float64 but weight is torch.float32"),
        ({"x": X.long()}, TypeError, "x must be a floating-point"),
        ({"threshold": torch.zeros(4, dtype=torch.long)}, TypeError, "threshold must be a floating-point"),
        ({"bias": torch.zeros(4, dtype=torch.float64)}, TypeError, "bias is torch.float64"),
        ({"x": X.to("meta")}, ValueError, "same device"),
        ({"threshold": torch.tensor([0.0, float("nan"), 0.0, float("inf")])}, ValueError, r"non-finite .* \[1, 3\]"),
        ({"weight": [[1.0]]}, TypeError, "weight must be a torch.Tensor"),
        ({"backend": "cuda"}, ValueError, "backend must be one of"),
        ({"backward_mode": "approx"}, ValueError, "backward_mode must be one of"),
        ({"sample_fraction": 0.0}, ValueError, "sample_fraction"),
        ({"sample_fraction": 1.5}, ValueError, "sample_fraction"),
        ({"collapse_density": 1.0}, ValueError, "collapse_density"),
        ({"collapse_density": -0.1}, ValueError, "collapse_density"),
    ],
)
def test_threshold_linear_rejects(kwargs, exc, match):
    args = {"x": X, "weight": W, "threshold": TAU, "bias": None}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        threshold_linear(**args)


def test_non_finite_check_can_be_turned_off_and_nan_thresholds_prune():
    tau = torch.full((4,), float("nan"))
    y = threshold_linear(X, W, tau, check_finite=False)
    assert (y == 0).all()  # s > NaN is false: NaN thresholds prune (documented)


def test_triton_backend_on_cpu_without_interpreter_explains(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="runs on CUDA tensors.*'compact' on CPU"):
        threshold_linear(X, W, TAU, backend="triton")


@pytest.mark.parametrize("backend", ["auto", "compact", "reference"])
def test_every_cpu_backend_name_is_accepted(backend):
    torch.testing.assert_close(threshold_linear(X, W, TAU, backend=backend), X @ W.t())
    assert ThresholdLinear(3, 4, backend=backend).backend == backend


def test_triton_backend_rejects_float64(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="float64"):
        threshold_linear(X.double(), W.double(), TAU.double(), backend="triton")


def test_layer_constructor_rejects_bad_config():
    with pytest.raises(ValueError, match="in_features must be a positive integer"):
        ThresholdLinear(0, 3)
    with pytest.raises(ValueError, match="out_features must be a positive integer"):
        ThresholdLinear(3, 2.5)
    with pytest.raises(ValueError, match="backward_mode"):
        ThresholdLinear(3, 3, backward_mode="none")
    with pytest.raises(ValueError, match="backend"):
        ThresholdLinear(3, 3, backend="cudnn")
    with pytest.raises(TypeError, match="nn.Linear"):
        ThresholdLinear.from_dense(torch.nn.Conv2d(1, 1, 1))


def test_layer_forward_names_the_problem():
    layer = ThresholdLinear(3, 4)
    with pytest.raises(ValueError, match="expects 3"):
        layer(torch.randn(2, 7))
    with torch.no_grad():
        layer.threshold[2] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite .* \[2\]"):
        layer(torch.randn(2, 3))
    with pytest.raises(ValueError, match="non-finite"):
        layer.to_dense()


def test_row_mask_rejects_bad_input():
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        threshold_row_mask(torch.randn(4), TAU)
    with pytest.raises(ValueError, match=r"threshold must have shape \(4,\)"):
        threshold_row_mask(W, torch.zeros(3))
    with pytest.raises(TypeError, match="weight must be a floating-point"):
        threshold_row_mask(W.long(), TAU)
    with pytest.raises(ValueError, match="threshold is on meta"):
        threshold_row_mask(W, TAU.to("meta"))
    with pytest.raises(ValueError, match=r"non-finite .* \[0\]"):
        threshold_row_mask(W, torch.tensor([float("nan"), 0.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="collapse_density"):
        threshold_row_mask(W, TAU, collapse_density=2.0)
    assert threshold_row_mask(torch.randn(4, 2, 3, 3), TAU).mask.shape == (4,)  # conv-shaped weights


def test_layer_options_are_one_frozen_value_validated_when_set():
    import copy
    import dataclasses
    import pickle

    from spafl._options import ThresholdOptions, from_key

    layer = ThresholdLinear(3, 4, backward_mode="sample", sample_fraction=0.5)
    options = layer.options
    assert isinstance(options, ThresholdOptions) and options.sample_fraction == 0.5 and options.collapse_density == 0.01
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.backward_mode = "skip"
    assert from_key(options.key) == options and hash(from_key(options.key)) == hash(options)
    layer.backward_mode = "skip"  # a setting of the layer replaces its options
    assert layer.options == options.replace(backward_mode="skip") and layer.backward_mode == "skip"
    with pytest.raises(ValueError, match="backward_mode"):
        layer.backward_mode = "none"
    assert layer.backward_mode == "skip"  # unchanged by the refused assignment
    with pytest.raises(TypeError, match="skip_zero_inputs must be a bool"):
        layer.skip_zero_inputs = 1
    layer.eval()
    assert layer.forward_options.collapse_density is None  # no guard in eval mode by default
    layer.collapse_in_eval = True
    assert layer.forward_options.collapse_density == 0.01
    for clone in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
        assert clone.options == layer.options and clone.forward_options == layer.forward_options
