"""Model-wide conversion: sparsify / densify, the layer iterators and state dicts."""

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import spafl
from spafl import ThresholdConv2d, ThresholdLinear


def _net():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Sequential(nn.Linear(4 * 4 * 4, 6)))


# ----------------------------------------------------------------------------- iterators


def test_threshold_layers_yields_layers_and_named_threshold_layers_pairs():
    model = spafl.sparsify(_net())
    layers = list(spafl.threshold_layers(model))
    named = list(spafl.named_threshold_layers(model))
    assert [type(m) for m in layers] == [ThresholdConv2d, ThresholdLinear]
    assert [n for n, _ in named] == ["0", "3.0"]
    assert all(a is b for a, (_, b) in zip(layers, named, strict=True))
    # like modules() / named_modules(): a layer used twice is listed once
    shared = ThresholdLinear(3, 3)
    assert list(spafl.named_threshold_layers(nn.Sequential(shared, nn.ReLU(), shared))) == [("0", shared)]
    for fn in (spafl.threshold_layers, spafl.named_threshold_layers):
        with pytest.raises(TypeError, match="expects an nn.Module, got list"):
            fn([shared])


# ----------------------------------------------------------------------------- sparsify


def _quiet_sparsify(model, **kwargs):
    """sparsify, failing on any warning (the models here leave nothing dense)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return spafl.sparsify(model, **kwargs)


def _step(model, x, lr=0.1):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model(x).square().sum().backward()
    opt.step()


def test_a_module_used_twice_is_converted_once_and_stays_shared():
    torch.manual_seed(0)
    lin = nn.Linear(10, 10)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    x = torch.randn(4, 10)
    y0 = model(x)
    assert sum(p.numel() for p in model.parameters()) == 110
    _quiet_sparsify(model)
    assert isinstance(model[0], ThresholdLinear) and model[0] is model[2]
    assert sum(p.numel() for p in model.parameters()) == 120  # + 10 thresholds, not a second layer
    torch.testing.assert_close(model(x), y0)
    _step(model, x)
    layer = model[0]
    torch.testing.assert_close(model(x), layer(torch.relu(layer(x))))
    # shared containers too: the layer inside is one module under two names
    block = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    outer = _quiet_sparsify(nn.Sequential(block, block))
    assert outer[0][0] is outer[1][0] and isinstance(outer[1][0], ThresholdLinear)


def test_tied_weights_stay_tied():
    torch.manual_seed(0)
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight
    model = nn.Sequential(a, nn.ReLU(), b)
    n_params = sum(p.numel() for p in model.parameters())
    _quiet_sparsify(model)
    assert model[0].weight is model[2].weight and model[0].weight is a.weight
    assert model[0].threshold is not model[2].threshold  # one threshold per layer
    assert sum(p.numel() for p in model.parameters()) == n_params + 12
    _step(model, torch.randn(3, 6))
    assert model[0].weight is model[2].weight


def test_an_optimizer_built_before_keeps_training_the_weights_and_is_warned_about_thresholds():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match=r"an optimizer \(SGD\) built before this call .*add_param_group"):
        spafl.sparsify(model)
    weight = model[0].weight.detach().clone()
    model(torch.randn(4, 5)).square().sum().backward()
    opt.step()
    assert not torch.equal(model[0].weight, weight)  # the optimizer still updates the layer's weight
    opt.add_param_group({"params": [m.threshold for m in spafl.threshold_layers(model)]})
    opt.zero_grad()
    model(torch.randn(4, 5)).square().sum().backward()
    opt.step()
    assert (model[0].threshold != 0).any()
    # built after: nothing to warn about
    fresh = _quiet_sparsify(nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 2)))
    torch.optim.SGD(fresh.parameters(), lr=0.1)


def test_hooks_move_to_the_threshold_layer_and_their_handles_still_remove_them():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    seen = []
    handles = [
        lin.register_forward_pre_hook(lambda m, args: seen.append(("pre", type(m).__name__))),
        lin.register_forward_hook(lambda m, args, out: seen.append(("fwd", type(m).__name__))),
        lin.register_forward_hook(lambda m, args, kwargs, out: seen.append(("kw", type(m).__name__)),
                                  with_kwargs=True),
        lin.register_full_backward_hook(lambda m, gi, go: seen.append(("bwd", type(m).__name__))),
    ]
    lin._register_state_dict_hook(lambda m, state, prefix, local: state.update({prefix + "tag": torch.ones(1)}))
    _quiet_sparsify(model)
    model(torch.randn(2, 4, requires_grad=True)).sum().backward()
    name = "ThresholdLinear"
    assert seen.count(("pre", name)) == seen.count(("fwd", name)) == seen.count(("kw", name)) == 2
    assert seen.count(("bwd", name)) == 2 and len(seen) == 8
    assert "0.tag" in model.state_dict()
    for handle in handles:
        handle.remove()
    seen.clear()
    model(torch.randn(2, 4, requires_grad=True)).sum().backward()
    assert seen == []


def test_warns_about_the_layers_it_leaves_dense_unless_excluded():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2)
            self.c1 = nn.Conv1d(2, 2, 3)
            self.c3 = nn.Conv3d(2, 2, 1)
            self.up = nn.ConvTranspose2d(2, 2, 2)
            self.lazy = nn.LazyLinear(3)
            self.param = nn.Linear(3, 3)
            parametrize.register_parametrization(self.param, "weight", _Double())
            self.head = nn.Linear(8, 2)

    with pytest.warns(UserWarning, match="left these layers dense") as record:
        model = spafl.sparsify(Model(), skip_zero_inputs=False)
    text = str(record[0].message)
    for name in ("attn.out_proj (NonDynamicallyQuantizableLinear)", "c1 (Conv1d)", "c3 (Conv3d)",
                 "up (ConvTranspose2d)", "lazy (LazyLinear)", "param (ParametrizedLinear)"):
        assert name in text
    assert isinstance(model.head, ThresholdLinear) and "head (" not in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spafl.sparsify(Model(), exclude=("attn", "c1", "c3", "up", "lazy", "param"), skip_zero_inputs=False)


class _Double(nn.Module):
    def forward(self, w):
        return 2 * w


def test_layers_whose_weight_a_hook_computes_are_refused_and_nothing_changes():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    prune.l1_unstructured(model[2], "weight", amount=0.5)
    with pytest.raises(ValueError, match="the weight of '2' is not a Parameter but computed from others"):
        spafl.sparsify(model)
    assert type(model[0]) is nn.Linear  # nothing converted
    _quiet_sparsify(model, exclude=("2",))
    assert isinstance(model[0], ThresholdLinear) and type(model[2]) is nn.Linear


def test_sparsify_validates_everything_before_changing_the_model():
    model = _net()
    for kwargs, exc, match in [
        ({"backward_mode": "fast"}, ValueError, "backward_mode must be one of"),
        ({"collapse_timing": "later"}, ValueError, "collapse_timing must be one of"),
        ({"collapse_in_eval": 1}, TypeError, "collapse_in_eval must be a bool"),
        ({"check_finite": "no"}, TypeError, "check_finite must be None or a bool"),
        ({"device": "cpu"}, TypeError, r"sparsify takes \['device'\] from each dense layer"),
        ({"threshold": 0.1}, TypeError, "unexpected keyword argument 'threshold'"),
        ({"exclude": 3}, TypeError, "exclude must be module names"),
        ({"exclude": ("9",)}, ValueError, "do not exist"),
        ({"skip_zero_inputs": "yes"}, TypeError, "skip_zero_inputs must be a bool"),
    ]:
        with pytest.raises(exc, match=match):
            spafl.sparsify(model, **kwargs)
        assert type(model[0]) is nn.Conv2d and type(model[3][0]) is nn.Linear


def test_exclude_by_container_name_string_or_predicate_and_shared_modules_must_agree():
    model = _quiet_sparsify(_net(), exclude="3")  # a container: everything inside stays dense
    assert isinstance(model[0], ThresholdConv2d) and type(model[3][0]) is nn.Linear
    lin = nn.Linear(4, 4)
    shared = nn.Sequential(lin, nn.ReLU(), lin)
    with pytest.raises(ValueError, match=r"one module used at 2 places, excluded at \['2'\] only"):
        spafl.sparsify(shared, exclude=lambda name, m: name == "2")
    assert type(shared[0]) is nn.Linear
    _quiet_sparsify(shared, exclude=("0", "2"))
    assert type(shared[0]) is nn.Linear


def test_sparsify_passes_the_layer_options_and_they_show_in_the_repr():
    model = _quiet_sparsify(_net(), collapse_timing="previous", collapse_in_eval=True, backward_mode="sample",
                            sample_fraction=0.5, check_finite=True)
    for layer in spafl.threshold_layers(model):
        assert layer.collapse_timing == "previous" and layer.collapse_in_eval and layer.backward_mode == "sample"
        assert "sample_fraction=0.5, collapse_timing='previous', collapse_in_eval=True" in repr(layer)
    assert model[3][0].skip_zero_inputs and "skip_zero_inputs=True" in repr(model[3][0])
    assert not model[0].skip_zero_inputs  # the conv's input is the model's input, not a ReLU's


# ----------------------------------------------------------------------------- densify, state dicts


def _trained_sparse_net():
    torch.manual_seed(0)
    model = _quiet_sparsify(_net())
    with torch.no_grad():
        for layer in spafl.threshold_layers(model):
            layer.threshold.copy_(spafl.threshold_for_density(layer.weight, 0.5))
    return model


def test_dense_state_dict_loads_into_the_plain_model_without_changing_the_sparse_one():
    model = _trained_sparse_net().eval()  # eval: forwards change no buffer
    x = torch.randn(3, 1, 6, 6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    state = spafl.dense_state_dict(model)
    plain = _net().eval()
    with pytest.raises(RuntimeError, match="Unexpected key.*threshold"):
        plain.load_state_dict(model.state_dict())  # what the plain model says to the sparse state dict
    plain.load_state_dict(state)  # strict
    torch.testing.assert_close(plain(x), model(x))
    assert list(state) == list(plain.state_dict())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    dense = spafl.densify(model)
    for k, v in dense.state_dict().items():
        assert torch.equal(v, state[k]), k
    layer = ThresholdLinear(3, 2)
    assert set(spafl.dense_state_dict(layer)) == {"weight", "bias"}
    with pytest.raises(TypeError, match="dense_state_dict expects an nn.Module"):
        spafl.dense_state_dict(state)


def test_a_plain_state_dict_loads_into_a_sparse_model_with_strict_false_keeping_its_thresholds():
    sparse = _trained_sparse_net()
    plain = _net()
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: \"0.threshold\""):
        sparse.load_state_dict(plain.state_dict())
    tau = sparse[0].threshold.detach().clone()
    result = sparse.load_state_dict(plain.state_dict(), strict=False)
    # (previous_density is filled in for state dicts older than the buffer, a plain one included)
    assert set(result.missing_keys) == {f"{p}.{k}" for p in ("0", "3.0") for k in ("threshold", "collapse_resets")}
    assert torch.equal(sparse[0].weight, plain[0].weight) and torch.equal(sparse[0].threshold, tau)


def test_densify_keeps_sharing_and_hooks_and_warns_about_tied_weights():
    lin = ThresholdLinear(4, 4)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    calls = []
    handle = lin.register_forward_hook(lambda m, a, o: calls.append(type(m)))
    spafl.densify(model)
    assert type(model[0]) is nn.Linear and model[0] is model[2]
    model(torch.randn(2, 4))
    assert calls == [nn.Linear, nn.Linear]
    handle.remove()
    a, b = ThresholdLinear(4, 4), ThresholdLinear(4, 4)
    b.weight = a.weight
    with pytest.warns(UserWarning, match=r"threshold layers \['0', '1'\] shared one weight"):
        spafl.densify(nn.Sequential(a, b))
