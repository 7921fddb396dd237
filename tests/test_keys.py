"""Keyed randomness: every stream key is collision-free by construction, the streams recorded
runs used are unchanged, and every client of a round draws its own batch order."""

import numpy as np
import pytest
import torch
from test_federated import small_config, synthetic

from spafl.federated import Simulator, keys, training
from spafl.federated.methods import spafl as spafl_method


def test_a_missing_or_extra_key_is_refused_not_read_as_zero():
    """NumPy's SeedSequence ignores trailing zero words: [s, 2, t, 0] and [s, 2, t] seed the
    same generator, so a key dropped from the training stream gave client 0's batch order to
    every client without any error. Each stream now takes exactly its number of keys."""
    assert np.array_equal(np.random.SeedSequence([5, 2, 7, 0]).generate_state(2),
                          np.random.SeedSequence([5, 2, 7]).generate_state(2))  # why the rule exists
    with pytest.raises(ValueError, match="'train' takes 2 key"):
        keys.derived_seed(5, "train", 7)
    with pytest.raises(ValueError, match="'sample' takes 1 key"):
        keys.derived_seed(5, "sample", 7, 0)
    with pytest.raises(ValueError, match="'init' takes 0 key"):
        keys.derived_seed(5, "init", 0)
    with pytest.raises(ValueError, match="unknown random stream"):
        keys.derived_seed(5, "batches", 1)


@pytest.mark.parametrize("bad", [-1, 2**32, 2**40, 1.0, True, "3"])
def test_seed_and_keys_are_single_32_bit_words(bad):
    """A seed of 2**32 or more is split into two words by SeedSequence and can then equal
    another (seed, stream) pair: refused, as are negative and non-integer values."""
    with pytest.raises(ValueError, match=r"in \[0, 2\*\*32\)"):
        keys.derived_seed(bad, "init")
    with pytest.raises(ValueError, match=r"in \[0, 2\*\*32\)"):
        keys.derived_seed(0, "train", 0, bad)


def test_the_config_refuses_a_seed_the_streams_cannot_take():
    with pytest.raises(ValueError, match="seed"):
        small_config(seed=2**32)
    assert small_config(seed=2**32 - 1).seed == 2**32 - 1


def test_a_stream_table_that_could_collide_is_refused():
    keys._check_streams(keys.STREAMS)  # the package's own table
    for table in (
        {"a": ((3,), 1), "b": ((3, 1), 0)},  # a(1) == b()
        {"a": ((3,), 0), "b": ((3, 0), 0)},  # b's trailing zero is dropped: b() == a()
        {"a": ((3,), 2), "b": ((3,), 1)},  # a(x, 0) == b(x)
        {"a": ((0,), 1)},  # a zero prefix word
    ):
        with pytest.raises(ValueError):
            keys._check_streams(table)
    keys._check_streams({"a": ((3,), 0), "b": ((3, 1), 0), "c": ((3, 2), 2), "d": ((4,), 3)})


def test_no_two_draws_of_a_run_share_a_seed():
    seeds = [keys.derived_seed(11, "init"), keys.derived_seed(11, "powerprop-init"), keys.derived_seed(11, "spectral")]
    seeds += [keys.derived_seed(11, "sample", t) for t in range(20)]
    seeds += [keys.derived_seed(11, "train", t, c) for t in range(20) for c in range(20)]
    assert len(set(seeds)) == len(seeds)


def test_the_recorded_streams_are_unchanged():
    """The encoding is the one recorded runs (results/, the golden histories) were drawn with:
    ``SeedSequence([seed, *prefix, *keys])``, pinned here by value."""
    assert keys.derived_seed(0, "sample", 0) == 2918264622725855778
    assert keys.derived_seed(0, "train", 3, 0) == 3118132001673402714
    assert keys.derived_seed(0, "train", 3, 1) == 1688911876263196301
    assert keys.derived_seed(0, "init") == 3291213472928352369
    assert keys.derived_seed(0, "powerprop-init") == 2122545592250308646
    assert keys.derived_seed(0, "spectral") == 2819337326339803526
    assert keys.derived_seed(2**32 - 1, "train", 2**32 - 1, 7) == 5820601390539050581
    raw = np.random.SeedSequence([9, 2, 4, 6]).generate_state(2, np.uint64)[0] >> 1
    assert keys.derived_seed(9, "train", 4, 6) == int(raw)


def test_every_client_of_a_round_gets_its_own_batch_order():
    """The mutation that went unnoticed: the client id dropped from the training key."""
    cfg = small_config(local_epochs=2)
    orders = {}
    for c in range(6):
        generators = keys.train_generators(cfg, 3, c, torch.device("cpu"))
        assert len(generators) == cfg.local_epochs
        orders[c] = tuple(torch.randperm(100, generator=generators[0]).tolist())
    assert len(set(orders.values())) == 6
    again = keys.train_generators(cfg, 3, 2, torch.device("cpu"))[0]
    assert tuple(torch.randperm(100, generator=again).tolist()) == orders[2]  # keyed: reproducible


def test_two_clients_with_the_same_data_train_differently():
    """End to end through the client's round: the same data and the same starting state, two
    client ids, different batch orders and so different thresholds after the round."""
    cfg = small_config(rounds=1)
    sim = Simulator(cfg, dataset=synthetic(n_train=200, n_test=40))
    message = spafl_method.broadcast(sim.server, cfg.th_update)
    data = sim.clients[0]
    state = sim.client_states[0]
    _, a = spafl_method.client_round(sim.model, state, message, data, cfg, 0, 0, sim.macs)
    _, b = spafl_method.client_round(sim.model, state, message, data, cfg, 0, 1, sim.macs)
    _, a_again = spafl_method.client_round(sim.model, state, message, data, cfg, 0, 0, sim.macs)
    assert all(torch.equal(a.update[k], a_again.update[k]) for k in a.update)
    assert any(not torch.equal(a.update[k], b.update[k]) for k in a.update)
    assert training.num_batches(data.num_train, cfg.batch_size, cfg.drop_last) > 1
