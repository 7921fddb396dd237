"""The baselines in the simulator: dense FedAvg, local-only, SparsyFed and its Top-K ablation;
the sparse wire format, Powerpropagation, activation pruning, global Top-K and the comparison."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_federated import small_config, strip_timing, synthetic
from torch import nn

from spafl import ThresholdConv2d, ThresholdLinear, densify, sparsify, threshold_for_density
from spafl.federated import Simulator, keys, training
from spafl.federated.accounting import payload_bits
from spafl.federated.compare import load_run, run_comparison
from spafl.federated.methods import GlobalState, make_method, weighted_mean
from spafl.federated.powerprop import (
    PowerpropConv2d,
    PowerpropLinear,
    global_topk_,
    powerprop_layers,
    spectral_exponent,
    to_powerprop,
    topk_keep,
)
from spafl.federated.wire import decode, encode, sparse_layout

# --- the sparse wire format -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("density,kind", [(1.0, "dense"), (0.3, "bitmap"), (0.01, "index")])
def test_sparse_encoding_round_trip_and_size(dtype, density, kind):
    g = torch.Generator().manual_seed(0)
    t = torch.randn(70, 130, generator=g).to(dtype)
    t[torch.rand(t.shape, generator=g) >= density] = 0
    payload = encode({"w": t, "b": torch.ones(3)}, sparse=True)
    header_len = int.from_bytes(payload[:4], "little")
    header = json.loads(payload[4 : 4 + header_len])
    assert (header["w"][2] if len(header["w"]) > 2 else "dense") == kind
    nnz = int(torch.count_nonzero(t))
    assert sparse_layout(t.numel(), nnz, t.element_size()) == (kind, len(payload) - 4 - header_len - 12)
    back = decode(payload)
    assert back["w"].dtype == dtype and torch.equal(back["w"], t) and torch.equal(back["b"], torch.ones(3))
    assert payload_bits({"w": t}, sparse=True) == 8 * sparse_layout(t.numel(), nnz, t.element_size())[1]


def test_sparse_layout_picks_the_smallest():
    assert sparse_layout(1000, 1000, 4) == ("dense", 4000)
    assert sparse_layout(1000, 100, 4) == ("bitmap", 400 + 125)  # 100 values + 1000 bits
    assert sparse_layout(1000, 10, 4) == ("index", 10 * (4 + 2))  # u16 positions
    assert sparse_layout(100_000, 10, 4) == ("index", 10 * (4 + 4))  # u32 positions
    assert sparse_layout(8, 0, 4) == ("index", 0)  # all zeros: nothing but the header


def test_malformed_sparse_payloads_are_refused():
    t = torch.zeros(1000)
    t[[3, 500]] = 1.0
    good = encode({"w": t}, sparse=True)
    for cut in (1, 3):
        with pytest.raises(ValueError, match="truncated"):
            decode(good[:-cut])
    n = int.from_bytes(good[:4], "little")
    header = json.loads(good[4 : 4 + n])
    for layout in (["index", 2, "u8"], ["zip", 2], ["index", 5000, "u16"]):
        h = json.dumps({"w": [*header["w"][:2], *layout]}).encode()
        with pytest.raises(ValueError):
            decode(len(h).to_bytes(4, "little") + h + good[4 + n :])
    # positions out of order (a duplicate) are refused
    body = bytearray(good[4 + n :])
    body[8:12] = body[10:12] * 2
    with pytest.raises(ValueError, match="positions"):
        decode(good[: 4 + n] + bytes(body))


# --- Powerpropagation, activation pruning, Top-K ----------------------------------------------


def test_powerprop_forward_is_sign_abs_pow_and_init_keeps_the_usual_distribution():
    torch.manual_seed(0)
    lin = PowerpropLinear(300, 200, beta=1.25)
    lin.reset_powerprop(torch.Generator().manual_seed(1))
    w = lin.effective_weight
    std = math.sqrt(1 / 300) / 0.87962566103423978
    w = w.detach()
    assert float(w.abs().max()) <= 2 * std + 1e-6
    assert abs(float(w.std()) - math.sqrt(1 / 300)) < 0.05 * math.sqrt(1 / 300)  # truncation restores 1/fan_in
    x = torch.randn(5, 300)
    torch.testing.assert_close(lin(x), x @ (torch.sign(lin.weight) * lin.weight.abs() ** 1.25).t() + lin.bias)
    with pytest.raises(ValueError, match="beta"):
        PowerpropLinear(3, 3, beta=0.5)


def _pruned_reference(x, keep):
    k = math.ceil(keep * x.numel())
    cut = x.abs().flatten().sort(descending=True).values[k - 1]
    return torch.where(x.abs() >= cut, x, torch.zeros(()))


@pytest.mark.parametrize("kind", ["linear", "linear3d", "conv"])
def test_activation_pruning_prunes_only_the_saved_input(kind):
    torch.manual_seed(0)
    if kind == "conv":
        layer = PowerpropConv2d(3, 5, 3, padding=1, bias=True, beta=1.25)
        x = torch.randn(4, 3, 7, 6, requires_grad=True)
    else:
        layer = PowerpropLinear(9, 5, bias=True, beta=1.25)
        x = torch.randn(*((4, 3) if kind == "linear3d" else (6,)), 9, requires_grad=True)
    with torch.no_grad():
        layer.weight[layer.weight.abs() < 0.1] = 0
    layer.train()
    layer.begin_round(0.4)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)

    w = layer.effective_weight.detach()
    xd = x.detach()
    x_ref = xd.clone().requires_grad_()
    w_ref = w.clone().requires_grad_()
    pruned = _pruned_reference(xd, 0.4)
    if kind == "conv":
        y_ref = F.conv2d(x_ref, w_ref, layer.bias, padding=1)
        y_ref.backward(g)
        grad_w = torch.nn.grad.conv2d_weight(pruned, w.shape, g, padding=1)
    else:
        y_ref = F.linear(x_ref, w_ref, layer.bias)
        y_ref.backward(g)
        grad_w = g.reshape(-1, 5).t() @ pruned.reshape(-1, 9)
    torch.testing.assert_close(y, y_ref)  # the forward is exact
    torch.testing.assert_close(x.grad, x_ref.grad)  # so is the input gradient
    assert not torch.allclose(grad_w, w_ref.grad)  # the weight gradient is not the dense one...
    chain = 1.25 * layer.weight.detach().abs() ** 0.25  # dw/dv
    torch.testing.assert_close(layer.weight.grad, grad_w * chain)  # ...it uses the pruned input
    # in eval mode nothing is pruned
    layer.eval()
    torch.testing.assert_close(layer(xd), y_ref.detach())


def test_conv_reuses_the_first_batch_cut_and_linear_recomputes():
    torch.manual_seed(0)
    conv = PowerpropConv2d(2, 3, 3, beta=1.25)
    conv.train()
    conv.begin_round(0.5)
    conv(torch.randn(2, 2, 5, 5))
    first = conv._cut.clone()
    conv(torch.randn(2, 2, 5, 5) * 100)
    assert torch.equal(conv._cut, first)
    conv.begin_round(0.5)
    assert conv._cut is None


def test_global_topk_keeps_exactly_the_largest_across_tensors():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(40, 30, generator=g), torch.randn(7, 3, 3, 3, generator=g) * 3
    all_values = torch.cat([a.flatten(), b.flatten()]).abs()
    kept = global_topk_([a, b], 0.9)
    assert kept == topk_keep(all_values.numel(), 0.9) == round(0.1 * all_values.numel())
    survivors = torch.cat([a.flatten(), b.flatten()]).abs()
    assert int(torch.count_nonzero(survivors)) == kept
    cut = all_values.sort(descending=True).values[kept - 1]
    assert float(survivors[survivors > 0].min()) >= float(cut)
    # per-tensor sparsity follows from the global ranking: the larger-scale b keeps more
    assert float((b != 0).float().mean()) > float((a != 0).float().mean())
    with pytest.raises(ValueError, match="sparsity"):
        global_topk_([a], 1.0)


def test_spectral_exponent_on_a_rank_one_matrix():
    u, v = torch.rand(6) + 0.1, torch.rand(12) + 0.1
    m = torch.outer(u, v)  # rank one and positive: one power iteration gives sigma_1 exactly
    sigma = float(torch.linalg.svdvals(m)[0])
    beta = spectral_exponent(m.view(6, 3, 2, 2), torch.Generator().manual_seed(0))
    assert beta == pytest.approx(1 + float(m.mean()) / sigma, rel=1e-5)


def test_to_powerprop_converts_every_linear_and_conv_and_can_keep_the_function():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    x = torch.randn(2, 1, 6, 6)
    expected = model(x)
    to_powerprop(model, beta=1.5, reinit=False)
    assert [type(m) for _, m in powerprop_layers(model)] == [PowerpropConv2d, PowerpropLinear]
    torch.testing.assert_close(model.eval()(x), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="padding"):
        to_powerprop(nn.Sequential(nn.Conv2d(1, 1, 3, padding="same")))


def test_densify_is_the_inverse_of_sparsify():
    torch.manual_seed(0)
    model = sparsify(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 6)))
    lin = model[3]
    with torch.no_grad():
        lin.threshold.copy_(threshold_for_density(lin.weight, 0.5))
    x = torch.randn(3, 1, 6, 6)
    expected = model(x)
    densify(model)
    assert type(model[0]) is nn.Conv2d and type(model[3]) is nn.Linear
    assert int((model[3].weight.abs().sum(1) == 0).sum()) == 3
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(TypeError):
        densify(ThresholdLinear(2, 2))
    assert not isinstance(densify(nn.Sequential(ThresholdConv2d(1, 1, 1)))[0], ThresholdConv2d)


# --- the methods in the simulator ---------------------------------------------------------------


def _state_floats(sim):
    return sum(v.numel() for v in sim.model.state_dict().values() if v.is_floating_point())


def test_fedavg_round_exchanges_the_whole_model_and_averages_by_sample_count():
    cfg = small_config(method="fedavg", rounds=1)
    uploads = []

    def spy(*args):
        new_state, report = make_method(cfg).client_round(*args)
        uploads.append((report.update, report.num_samples))
        return new_state, report

    sim = Simulator(cfg, client_fn=spy)
    assert not any(hasattr(m, "threshold") for m in sim.model.modules())
    p = _state_floats(sim)
    row = sim.run_round()
    k = cfg.clients_per_round
    assert row["comm_bits_paper"] == 2 * k * p * 32
    assert row["nnz_up"] <= k * p and row["bytes_up"] == k * len(encode(uploads[0][0]))
    expected = weighted_mean([u for u, _ in uploads], [n for _, n in uploads])
    assert len({n for _, n in uploads}) > 1  # the weighting matters here
    for name, value in sim.server.params.items():
        torch.testing.assert_close(value, expected[name])
    uniform = weighted_mean([u for u, _ in uploads], [1] * k)
    assert any(not torch.allclose(uniform[n], expected[n]) for n in expected)
    # personalised accuracy is the global model on each client's split, plus the whole test set
    sim.method.load(sim.model, sim.server, None)
    for i, client in enumerate(sim.clients):
        assert sim.eval_cache[i]["acc"] == training.evaluate(sim.model, None, client, 64, None, sim.prunable)["acc"]
    sim.method.load(sim.model, sim.server, None)
    assert row["acc_global"] == training.evaluate(sim.model, None, sim.global_test, 64, None, sim.prunable)["acc"]
    assert sim.global_test.num_test == sum(c.num_test for c in sim.clients)
    assert sim.summary()["final_acc_global"] == row["acc_global"]


def test_local_only_sends_nothing_and_only_sampled_clients_change():
    cfg = small_config(method="local", rounds=1)
    sim = Simulator(cfg)
    before = [s for s in sim.client_states]
    row = sim.run_round()
    assert row["comm_bits_paper"] == 0 and row["bytes_down"] == row["bytes_up"] == 0
    sampled = {int(c) for c in row["sampled"].split()}
    for i, (old, new) in enumerate(zip(before, sim.client_states, strict=True)):
        changed = any(not torch.equal(old[k], new[k]) for k in old)
        assert changed == (i in sampled)
    assert "acc_global" not in row


def test_sparsyfed_round_topk_target_sparse_payload_and_global_sparsity():
    cfg = small_config(method="sparsyfed", rounds=2, sparsity=0.8)
    uploads = []

    def spy(*args):
        new_state, report = sim.method.client_round(*args)
        uploads.append(report.update)
        return new_state, report

    sim = Simulator(cfg, client_fn=spy)
    weights = [f"{n}.weight" for n, _ in sim.prunable]
    total = sum(sim.server.params[k].numel() for k in weights)
    keep = topk_keep(total, 0.8)
    rows = [sim.run_round(), sim.run_round()]
    for u in uploads:  # every upload meets the Top-K target exactly
        assert sum(int(torch.count_nonzero(u[k])) for k in weights) == keep
    k = cfg.clients_per_round
    first = rows[0]
    assert first["comm_bits_paper"] == k * payload_bits(dict(_initial_params(cfg)), sparse=False) + sum(
        payload_bits(u, sparse=True) for u in uploads[:k])
    assert first["bytes_up"] == sum(len(encode(u, sparse=True)) for u in uploads[:k])
    assert first["bytes_up"] < 0.5 * k * len(encode(uploads[0]))  # the sparse encoding pays off
    # after aggregation the global model is the union of the client masks: at most the target
    for row in rows:
        assert 0 < row["global_sparsity"] <= 0.8 + 1e-9
    nnz = sum(int(torch.count_nonzero(sim.server.params[k])) for k in weights)
    assert rows[-1]["global_sparsity"] == pytest.approx(1 - nnz / total)
    assert 0 < rows[-1]["mask_iou"] <= 1 and rows[-1]["regrowth"] == 0.0


def _initial_params(cfg):
    return Simulator(cfg.replace(rounds=1)).server.params


def test_server_rejects_an_update_denser_than_the_topk_target():
    cfg = small_config(method="sparsyfed", rounds=1)

    def dense_client(*args):
        new_state, report = sim.method.client_round(*args)
        w = report.update["fc3.weight"]  # one weight more than the target
        w.view(-1)[int(torch.nonzero(w.view(-1) == 0)[0])] = 1e-3
        return new_state, report

    sim = Simulator(cfg, client_fn=dense_client)
    before = {k: v.clone() for k, v in sim.server.params.items()}
    with pytest.warns(UserWarning, match="Top-K target"):
        row = sim.run_round()
    assert row["rejected"] == cfg.clients_per_round and row["participants"] == 0
    assert all(torch.equal(before[k], sim.server.params[k]) for k in before)


@pytest.mark.parametrize("beta,regrows", [(1.25, False), (1.0, True)])
def test_powerprop_keeps_pruned_weights_at_zero_only_when_beta_above_one(beta, regrows):
    cfg = small_config(method="sparsyfed", beta=beta, momentum=0.9, weight_decay=1e-3, rounds=1)
    sim = Simulator(cfg)
    method = sim.method
    message = {k: v.clone() for k, v in sim.server.params.items()}
    weights = [f"{n}.weight" for n, _ in sim.prunable]
    g = torch.Generator().manual_seed(0)
    for k in weights:  # a received model with half of its weights pruned
        message[k][torch.rand(message[k].shape, generator=g) < 0.5] = 0
    zeros = {k: message[k] == 0 for k in weights}
    captured = {}
    original = method.after_training

    def capture(model, before):
        captured.update({k: model.get_parameter(k).detach().clone() for k in weights})
        return original(model, before)

    method.after_training = capture
    _, report = method.client_round(sim.model, None, message, sim.clients[0], cfg, 0, 0, sim.macs)
    regrown = sum(int((zeros[k] & (captured[k] != 0)).sum()) for k in weights)
    assert (regrown > 0) == regrows
    assert report.stats["regrown"] == regrown
    assert any(not torch.equal(captured[k][~zeros[k]], message[k][~zeros[k]]) for k in weights)  # it trained


def test_topk_is_sparsyfed_with_beta_one_and_no_activation_pruning():
    sim = Simulator(small_config(method="topk", beta=2.0, rounds=1))
    layers = [m for _, m in sim.prunable]
    assert all(m.beta == 1.0 and not m.activation_pruning for m in layers)
    sf = Simulator(small_config(method="sparsyfed", beta=2.0, rounds=1))
    assert all(m.beta == 2.0 and m.activation_pruning for _, m in sf.prunable)


def test_spectral_variant_sets_beta_per_layer_from_the_latent_weights():
    sim = Simulator(small_config(method="sparsyfed", spectral_exponent=True, rounds=1))
    sim.run_round()
    sim.method.load(sim.model, sim.server, None)
    for i, (_, layer) in enumerate(sim.prunable):
        assert layer.beta > 1.0
        assert layer.beta == pytest.approx(spectral_exponent(layer.weight, _gen(sim, i)))
    betas = {n: m.beta for n, m in sim.prunable}
    assert len(set(betas.values())) == len(betas)


def _gen(sim, i):
    seed = keys.derived_seed(sim.config.seed, "spectral")
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, i]).generate_state(1)[0]))


@pytest.mark.parametrize("method", ["fedavg", "local", "sparsyfed", "topk"])
def test_methods_learn_and_resume_exactly(tmp_path, method):
    data = synthetic(noise=0.3)
    extra = {"spectral_exponent": True} if method == "sparsyfed" else {}
    cfg = small_config(method=method, rounds=6, clients_per_round=4, local_epochs=2, sparsity=0.5, **extra)
    full = Simulator(cfg, dataset=data)
    history = strip_timing(full.run())
    assert history[-1]["acc_mean"] > 45  # chance is 10%
    part = Simulator(cfg, dataset=data, out_dir=tmp_path)
    part.run(3)
    part.save_checkpoint()
    resumed = Simulator.resume(tmp_path, cfg, dataset=data)
    assert strip_timing(resumed.run()) == history


def test_method_config_errors():
    for changes, message in [({"method": "fedprox"}, "method"), ({"sparsity": 1.0}, "sparsity"),
                             ({"beta": 0.5}, "beta"), ({"lr_final": -1.0}, "lr_final"),
                             ({"spectral_exponent": True, "method": "topk"}, "spectral_exponent")]:
        with pytest.raises(ValueError, match=message):
            small_config(**changes)


def test_exponential_learning_rate_schedule():
    cfg = small_config(lr=0.5, lr_final=0.01, rounds=10)
    assert training.learning_rate(cfg, 0) == pytest.approx(0.5)
    assert training.learning_rate(cfg, 10) == pytest.approx(0.01)
    assert training.learning_rate(cfg, 5) == pytest.approx(math.sqrt(0.5 * 0.01))
    assert training.learning_rate(cfg.replace(lr_final=None, lr_decay=0.9), 2) == pytest.approx(0.5 * 0.81)


def test_models_of_every_method_build_from_the_same_architecture():
    for method in ("spafl", "fedavg", "sparsyfed"):
        sim = Simulator(small_config(method=method, rounds=1))
        assert [n for n, _ in sim.prunable] == ["conv1", "conv2", "fc3", "fc4"]
    state = GlobalState({"w": torch.ones(2)}, 3)
    again = GlobalState.from_state_dict(state.state_dict())
    assert again.round == 3 and torch.equal(again.params["w"], torch.ones(2))


# --- the comparison -----------------------------------------------------------------------


def test_compare_runs_every_method_and_seed_and_resumes(tmp_path, capsys):
    cfg = small_config(rounds=2)
    runs = run_comparison(cfg, ["spafl", "fedavg", "local"], [0, 1], tmp_path, log=lambda *_: None)
    assert [(r["method"], r["seed"]) for r in runs] == [("spafl", 0), ("fedavg", 0), ("local", 0), ("spafl", 1),
                                                         ("fedavg", 1), ("local", 1)]
    table = (tmp_path / "comparison.md").read_text()
    assert table.count("\n") == 2 + 3
    accs = [r["final_acc"] for r in runs if r["method"] == "fedavg"]
    assert f"{np.mean(accs):.2f} +- {np.std(accs):.2f}" in table
    assert (tmp_path / "accuracy_vs_round.png").is_file() and (tmp_path / "accuracy_vs_gbit.png").is_file()
    csv_rows = (tmp_path / "comparison.csv").read_text().splitlines()
    assert len(csv_rows) == 7
    # asking for more rounds extends the runs already there instead of starting over
    log = []
    run_comparison(cfg.replace(rounds=3), ["fedavg"], [0], tmp_path, log=log.append)
    assert "resuming after round 2" in log[0]
    assert load_run(tmp_path / "fedavg-seed0")["rounds"] == 3
    with pytest.raises(ValueError, match="methods"):
        run_comparison(cfg, ["fedprox"], [0], tmp_path)
    with pytest.raises(ValueError, match="seed"):
        run_comparison(cfg, ["fedavg"], [], tmp_path)


def test_cli_compare_and_train_method(tmp_path, capsys):
    from spafl.cli import main

    assert main(["compare", "--methods", "fedavg,sparsyfed", "--seeds", "3", "--rounds", "1", "--num-clients", "6",
                 "--clients-per-round", "2", "--out", str(tmp_path / "cmp"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "| FedAvg (dense) | 1 | 1 |" in out and "| SparsyFed | 1 | 1 |" in out
    assert main(["train", "--method", "topk", "--rounds", "1", "--out", str(tmp_path / "t"), "--no-progress",
                 "--no-plot"]) == 0
    assert "topk" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--method", "fedprox"])
