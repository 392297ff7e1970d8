"""The mean of several clients' rounded updates, split back into each client's (``gradleak.attacks.demix``)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradleak import obfuscation
from gradleak.attacks import run_attack
from gradleak.attacks.demix import MAX_TABLE, client_steps, levels, read_steps, readable, split
from gradleak.capture import capture
from gradleak.data import load_dataset
from gradleak.federated import Protocol, client_update
from gradleak.federated.protocol import client_slices
from gradleak.metrics import score
from gradleak.models import build


def _clients(k: int, b: int, specs, *, size: int = 16, protocol: Protocol | None = None):
    """K clients' mean update as ``capture`` makes it, each client's own obfuscated update beside it (the
    same steps, the same generator, client after client), and the batch."""
    ds = load_dataset("phantoms:n=64", size=size)
    batch = ds.batch(list(range(0, 3 * k * b, 3)))
    proto = protocol or Protocol(num_clients_averaged=k)
    obs, _ = capture(batch.images, batch.labels, arch="lenet5", protocol=proto, model_seed=0,
                     obfuscations=list(specs), obfuscation_seed=0, labels_known=True)
    model = build("lenet5", 2, 1, size, seed=0, mean=[0.5], std=[0.5])
    sent = {name: v.detach().clone() for name, v in model.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    context = obfuscation.Context.from_protocol(obs.protocol)
    own = []
    for sl in client_slices(k * b, k):
        update, _ = client_update(model, sent, batch.images[sl], batch.labels[sl], proto)
        own.append(obfuscation.apply(list(specs), update, generator, context)[0])
    return obs, own, batch


@pytest.mark.parametrize("k,spec", [(3, {"name": "qsgd", "levels": 16}), (4, {"name": "qsgd", "levels": 4}),
                                    (2, {"name": "uniform", "levels": 8})])
def test_the_mean_of_clients_rounded_updates_splits_into_each_clients_own(k, spec):
    obs, own, batch = _clients(k, 2, [spec])
    obs.buffers = {"bn.running_mean": torch.zeros(3)}  # statistics sent with it are the clients' mean
    clients, info = split(obs)
    assert clients is not None, info
    assert info["clients"] == k and info["entries_read"] == 1.0 and "no client's own" in info["buffers"]
    assert all(c.buffers is None and not c.protocol.sends_buffers for c in clients)
    records = obs.obfuscation[0]["per_client"]
    for i, c in enumerate(clients):
        for name, v in own[i].items():
            assert torch.equal(c.update[name], v), (i, name)
        assert c.protocol.num_clients_averaged == 1 and c.num_images == 2
        assert c.obfuscation[0]["scale"] == records[i]["scale"] and "per_client" not in c.obfuscation[0]
        assert torch.equal(c.labels, batch.labels[2 * i:2 * i + 2])
        assert c.global_state is obs.global_state


@pytest.mark.parametrize("k,spec", [(3, {"name": "qsgd", "levels": 16}), (4, {"name": "qsgd", "levels": 4}),
                                    (2, {"name": "uniform", "levels": 8}),
                                    (2, {"name": "qsgd", "levels": 16, "norm": "l2"})])
def test_a_server_not_told_the_clients_scales_reads_their_steps_off_the_mean(k, spec):
    obs, own, batch = _clients(k, 2, [spec])
    name = "fc1.weight"
    div = spec["levels"] - 1 if spec["name"] == "qsgd" else 1
    truth = sorted(c["scale"][name] / div for c in obs.obfuscation[0]["per_client"])
    top = spec["levels"] - 1
    assert read_steps(obs.update[name], k, top) == pytest.approx(truth, rel=1e-6)
    clients, info = split(obs, source="mean")
    assert clients is not None, info
    assert info["steps"] == (f"read off the mean's most frequent values of '{name}' (the other tensors each "
                             f"client's mean)")
    assert info["per_tensor"][name] == 1.0 and info["per_tensor"]["conv1.weight"] == 0.0
    # each client's own update of the largest tensor (to the float rounding of a step read off a float32
    # mean), the clients in the order of their steps
    order = sorted(range(k), key=lambda i: obs.obfuscation[0]["per_client"][i]["scale"][name])
    for c, i in zip(clients, order):
        assert torch.allclose(c.update[name], own[i][name], rtol=1e-6, atol=0)
        assert torch.equal(c.update["conv1.weight"], obs.update["conv1.weight"])  # which client's is not known
        assert c.labels is None and "per_client" not in c.obfuscation[0]
        # its record's scale: that of its read step (QSGD: s steps; uniform rounding: the step)
        assert c.obfuscation[0]["scale"][name] == pytest.approx(obs.obfuscation[0]["per_client"][i]["scale"][name],
                                                                rel=1e-6)
    # records with per-client values: those are used, in the records' order
    told, _ = split(obs)
    assert all(torch.equal(told[i].update["conv1.weight"], own[i]["conv1.weight"]) for i in range(k))


def test_a_fedavg_delta_of_clients_splits_the_same_way():
    proto = Protocol("fedavg", local_steps=2, local_lr=0.1, num_clients_averaged=2)
    obs, own, _ = _clients(2, 2, [{"name": "qsgd", "levels": 16}], protocol=proto)
    clients, info = split(obs)
    assert clients is not None, info
    assert all(torch.equal(clients[i].update[n], own[i][n]) for i in range(2) for n in own[i])
    # the steps read off the mean too (the clients in the order of their steps)
    read, info = split(obs, source="mean")
    assert read is not None, info
    order = sorted(range(2), key=lambda i: obs.obfuscation[0]["per_client"][i]["scale"]["fc1.weight"])
    assert all(torch.allclose(read[j].update["fc1.weight"], own[i]["fc1.weight"], rtol=1e-6, atol=0)
               for j, i in enumerate(order))
    assert clients[0].protocol.algorithm == "fedavg" and clients[0].protocol.local_steps == 2


@settings(max_examples=30, deadline=None)
@given(k=st.integers(2, 5), top=st.sampled_from([1, 3, 15]), seed=st.integers(0, 10_000),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_levels_are_read_back_from_the_mean_of_clients_values(k, top, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    steps = (0.5 + torch.rand(k, generator=g, dtype=torch.float64)) * 10 ** float(torch.randint(-6, 0, (1,),
                                                                                                   generator=g))
    # levels as a rounded update has them: mostly zero or one step, a few up to the top
    n = (torch.randn(k, 4000, generator=g, dtype=torch.float64) * 0.8).round().clamp(-top, top).to(torch.int32)
    n[:, :40] = torch.randint(-top, top + 1, (k, 40), generator=g, dtype=torch.int32)
    sent = (n.double() * steps[:, None]).to(dtype)  # each client's value as it sends it
    mean = (sent.double().sum(dim=0) / k).to(dtype)
    found, read, _ = levels(mean, steps.tolist(), top)
    bound = readable(k, top)  # (2 bound + 1)^k sums in the largest table
    assert (2 * bound + 1) ** k <= MAX_TABLE and (bound == top or (2 * bound + 3) ** k > MAX_TABLE)
    within = n.abs().amax(dim=0) <= bound
    # the levels returned (the nearest sum's, read or ambiguous) are right nearly everywhere; an entry two
    # sums explain about equally is not counted as read, and where the steps nearly satisfy a small integer
    # relation (as random steps sometimes do, to 1e-7) a whole class of entries is not. Over 2,001 seeds of
    # this draw (float32, levels up to 15): 4 clients at worst 99.05 % read, 99.28 % right; 5 clients 86.4 %
    # read, 98.4 % right (where fewer than MIN_READ are read, the split does not stand)
    right = (found == n).all(dim=0)
    assert float(right[within].double().mean()) >= 0.98
    assert float(right[within & read].double().mean()) >= 0.98
    assert float(read[within].double().mean()) >= (0.98 if k <= 4 or dtype == torch.float64 else 0.8)


def test_clients_with_equal_steps_are_ambiguous_and_a_zero_step_client_sent_zeros():
    g = torch.Generator().manual_seed(0)
    n = torch.randint(-2, 3, (2, 1000), generator=g, dtype=torch.int32)
    mean = ((n.double() * 1e-3).sum(dim=0) / 2).float()  # two clients on one grid: sums name no client
    _, read, ambiguous = levels(mean, [1e-3, 1e-3], 2)
    # most entries have several level vectors of one sum; the rest only in tables not searched (the smallest
    # table with a match wins), and the split, needing 99 % read, stands on neither
    assert float(ambiguous.double().mean()) > 0.5 and float(read.double().mean()) < 0.5
    assert not bool((read & ambiguous).any())
    # a client whose tensor was all zeros (step 0): the mean is the other's over K, read with K
    obs, own, _ = _clients(2, 2, [{"name": "qsgd", "levels": 16}])
    obs.update["conv1.bias"] = (own[0]["conv1.bias"].double() / 2).float()
    obs.obfuscation[0]["per_client"][1]["scale"]["conv1.bias"] = 0.0
    clients, info = split(obs)
    assert clients is not None, info
    assert torch.equal(clients[0].update["conv1.bias"], own[0]["conv1.bias"])
    assert not bool(clients[1].update["conv1.bias"].any())


def test_what_is_not_split_says_why_and_bad_records_fall_back_to_steps_read_off_the_mean():
    one = _clients(1, 2, [{"name": "qsgd", "levels": 16}])[0]
    assert split(one) == (None, "one client's update")
    noise, _, _ = _clients(2, 2, [{"name": "relative_gaussian", "sigma0": 0.1}])
    assert split(noise) == (None, "the clients' last obfuscation is not a quantizer")
    bucketed, _, _ = _clients(2, 2, [{"name": "qsgd", "levels": 16, "bucket_size": 64}])
    assert split(bucketed) == (None, "the records do not give each client's step for each tensor, and QSGD's steps "
                                     "per bucket are not read off the mean")
    assert split(bucketed, source="mean")[1] == ("the records' steps are not used, and QSGD's steps per bucket are "
                                                 "not read off the mean")
    # steps that are not the clients' (a record edited by another tool): the mean is no sum of their levels
    obs, _, _ = _clients(2, 2, [{"name": "qsgd", "levels": 16}])
    pc = obs.obfuscation[0]["per_client"]
    pc[1]["scale"] = {name: 1.37 * v for name, v in pc[1]["scale"].items()}
    clients, why = split(obs)
    assert clients is None and why.startswith("only ") and "one sum of the clients' levels" in why
    assert isinstance(client_steps(obs), tuple)
    # a record from another tool: steps that are no number, per-client entries that are no dicts; the
    # steps are then read off the mean, which needs no record of them, unless the mean does not show them
    # (here: fewer nonzero entries of the largest tensor than READ_MIN_ENTRIES)
    pc[1]["scale"] = {name: float("nan") for name in pc[1]["scale"]}
    clients, info = split(obs)
    assert clients is not None and info["steps"].startswith("read off the mean's most frequent values of 'fc1.weight'")
    obs.obfuscation[0]["per_client"] = ["x", "y"]
    obs.update["fc1.weight"][1:] = 0
    assert split(obs) == (None, "the records do not give each client's quantizer values, and the clients' steps "
                                "do not show in the mean's values of 'fc1.weight'")
    two, _, _ = _clients(2, 2, [{"name": "relative_gaussian", "sigma0": 0.1}, {"name": "qsgd", "levels": 16}])
    two.obfuscation[0]["per_client"] = [{"sigma": 0.1}]  # an earlier step's values for one client of two
    two.update["fc1.weight"][1:] = 0
    assert split(two) == (None, "the records do not give each client's values, and the clients' steps do not "
                                "show in the mean's values of 'fc1.weight'")

    # out of time: nothing is split
    late, _, _ = _clients(2, 2, [{"name": "qsgd", "levels": 16}])
    assert split(late, time_limit=0.0)[1].endswith("in the 0.0 s the split may take")
    # too many clients for a table of their levels (3^K sums of one step each): not split, nothing built
    many, _, _ = _clients(14, 1, [{"name": "qsgd", "levels": 4}])
    assert split(many) == (None, f"14 clients: their levels of one step alone make {3 ** 14} sums, past the "
                                 f"{MAX_TABLE} a table holds")


def test_auto_attacks_each_client_of_a_split_mean_and_says_so():
    obs, _, batch = _clients(2, 2, [{"name": "qsgd", "levels": 16}])
    obs.labels = None  # labels inferred
    rec = run_attack("auto", obs, {"time_budget": 16}, seed=0, progress=False)
    assert rec.images.shape == batch.images.shape and rec.labels.shape == (4,)
    pipe = rec.extras["pipeline"]
    assert pipe["stages"][0] == "client split" and len(pipe["clients"]) == 2
    assert [c["separated"] for c in pipe["clients"]] == [2, 2] and pipe["separated"] == 4
    assert sum(c["budget"]["seconds"] for c in pipe["clients"]) <= rec.seconds
    assert pipe["clients_split"]["entries_read"] == 1.0 and pipe["images"] == 4
    assert rec.threat_model["attack_pipeline"].startswith("split into 2 clients' updates, then per client: ")
    assert "rounding steps" in rec.threat_model["clients_split"]
    assert rec.seconds < 16 * 1.1
    split_psnr = score(batch.images, batch.labels, rec.images, rec.labels)["psnr"]
    # not split: the mean read as one batch of four, its rounding no client's
    whole = run_attack("auto", obs, {"time_budget": 16, "split_clients": False}, seed=0, progress=False)
    assert "clients" not in whole.extras["pipeline"] and "clients_split" not in whole.threat_model
    assert whole.extras["pipeline"]["clients_split"] == "not split: split_clients is off"
    assert split_psnr > 30
    assert split_psnr >= score(batch.images, batch.labels, whole.images, whole.labels)["psnr"] - 1.0


def test_auto_reads_the_clients_steps_off_the_mean_where_it_is_not_told_their_scales():
    obs, _, batch = _clients(2, 2, [{"name": "qsgd", "levels": 16}])
    obs.labels = None
    rec = run_attack("auto", obs, {"time_budget": 30, "client_steps": "mean"}, seed=0, progress=False)
    pipe = rec.extras["pipeline"]
    assert pipe["stages"][0] == "client split" and pipe["separated"] == 4
    assert pipe["clients_split"]["steps"].startswith("read off the mean's most frequent values of 'fc1.weight'")
    assert pipe["clients_split"]["steps_read_off"] == "fc1.weight"
    assert "conv1.weight" in pipe["clients_split"]["tensors_given_the_mean"]
    assert rec.threat_model["per_client_scales_known"] is False
    assert "read off the mean's most frequent values" in rec.threat_model["clients_split"]
    assert score(batch.images, batch.labels, rec.images, rec.labels)["psnr"] > 30


def test_a_mean_that_is_not_split_says_why_in_the_pipeline():
    obs, _, _ = _clients(2, 2, [{"name": "relative_gaussian", "sigma0": 0.1}])
    rec = run_attack("auto", obs, {"time_budget": 4}, seed=0, progress=False)
    assert rec.extras["pipeline"]["clients_split"] == "not split: the clients' last obfuscation is not a quantizer"
    # the split reads the clients' records: an attacker not told the obfuscation does not split
    rounded, _, _ = _clients(2, 2, [{"name": "qsgd", "levels": 16}])
    blind = run_attack("auto", rounded, {"time_budget": 4, "attacker_knows_obfuscation": False}, seed=0,
                       progress=False)
    assert blind.extras["pipeline"]["clients_split"] == "not split: the attacker is not told the obfuscation"
