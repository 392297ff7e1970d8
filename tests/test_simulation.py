"""Multi-round federated simulation: partitions, aggregation, the server step, and FedSGD = centralised SGD."""

from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gradleak.errors import UserError
from gradleak.federated.arithmetic import mean_buffers, mean_update
from gradleak.federated.partition import partition_by_patient
from gradleak.federated.simulation import (Evaluation, Server, Settings, Uploads, _client_order, schedule_dp,
                                          simulate)
from gradleak.models import build


@pytest.fixture(autouse=True)
def one_thread():
    # small models on a shared machine: one thread avoids OpenMP spinning against other processes
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _patients(counts_and_labels):
    """labels and patient ids for patients given as (number of images, label)."""
    labels, pids = [], []
    for j, (n, y) in enumerate(counts_and_labels):
        labels += [y] * n
        pids += [f"p{j}"] * n
    return np.array(labels), pids


def _owners(part, pids):
    owner = {}
    for k, idx in enumerate(part.clients):
        for i in idx:
            owner.setdefault(pids[i], set()).add(k)
    return owner


# ------------------------------------------------------------------------------------------ partitions
@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 1)), min_size=6, max_size=60),
       st.integers(1, 6), st.sampled_from(["iid", "dirichlet"]), st.floats(0.05, 50), st.integers(0, 10**6))
def test_partitions_are_disjoint_by_patient_and_cover_the_data(patients, k, scheme, alpha, seed):
    labels, pids = _patients(patients)
    k = min(k, len(patients))
    part = partition_by_patient(labels, pids, k, scheme=scheme, alpha=alpha, seed=seed, min_images=0)
    assert len(part.clients) == k
    allidx = np.concatenate(part.clients)
    assert sorted(allidx.tolist()) == list(range(len(labels)))  # every image once
    assert all(len(v) == 1 for v in _owners(part, pids).values())  # no patient on two clients
    if scheme == "iid":  # every client within one patient's images of N / K
        biggest = max(n for n, _ in patients)
        assert all(abs(len(c) - len(labels) / k) <= biggest for c in part.clients)


def test_dirichlet_partition_follows_its_drawn_proportions():
    patients = [(1 + j % 3, int(j % 4 == 0)) for j in range(200)]  # 50 class-1, 150 class-0 patients
    labels, pids = _patients(patients)
    part = partition_by_patient(labels, pids, 4, scheme="dirichlet", alpha=0.3, seed=7)
    assert part.proportions.shape == (2, 4)
    assert np.allclose(part.proportions.sum(1), 1)
    owner = {p: next(iter(ks)) for p, ks in _owners(part, pids).items()}
    plabel = {f"p{j}": y for j, (_, y) in enumerate(patients)}
    for c, n_c in ((0, 150), (1, 50)):
        per_client = Counter(owner[p] for p in plabel if plabel[p] == c)
        cuts = np.rint(np.cumsum(part.proportions[c]) * n_c).astype(int)
        expected = np.diff(np.concatenate([[0], cuts]))
        assert [per_client.get(k, 0) for k in range(4)] == expected.tolist()


@pytest.mark.parametrize("alpha", [0.5, 5.0])
def test_dirichlet_shares_have_the_dirichlet_variance(alpha):
    # a client's share of a class's patients is Beta(alpha, (K-1) alpha): mean 1/K, var (1/K)(1-1/K)/(K alpha+1)
    k, n_c = 5, 400
    labels, pids = _patients([(1, j % 2) for j in range(2 * n_c)])
    shares = []
    for seed in range(150):
        part = partition_by_patient(labels, pids, k, scheme="dirichlet", alpha=alpha, seed=seed, min_images=0)
        shares += [np.sum(labels[c] == 0) / n_c for c in part.clients]
    shares = np.array(shares)
    var = (1 / k) * (1 - 1 / k) / (k * alpha + 1)
    assert abs(shares.mean() - 1 / k) < 1e-9  # shares of one draw sum to one
    assert 0.8 * var < shares.var() < 1.2 * var


def test_small_alpha_skews_labels_more_than_large_alpha():
    labels, pids = _patients([(2, j % 2) for j in range(300)])

    def skew(alpha):
        out = []
        for seed in range(20):
            part = partition_by_patient(labels, pids, 6, scheme="dirichlet", alpha=alpha, seed=seed)
            out += [abs(labels[c].mean() - 0.5) for c in part.clients]
        return np.mean(out)

    assert skew(0.1) > 0.3 > 0.05 > skew(100.0)


def test_partition_errors_and_determinism():
    labels, pids = _patients([(2, j % 2) for j in range(10)])
    with pytest.raises(UserError, match="10 patients"):
        partition_by_patient(labels, pids, 11)
    with pytest.raises(UserError, match="alpha"):
        partition_by_patient(labels, pids, 2, scheme="dirichlet", alpha=0)
    with pytest.raises(UserError, match="unknown partition"):
        partition_by_patient(labels, pids, 2, scheme="pathological")
    with pytest.raises(UserError, match="raise alpha"):
        partition_by_patient(labels, pids, 5, scheme="dirichlet", alpha=0.01, min_images=4, max_attempts=5)
    a = partition_by_patient(labels, pids, 3, scheme="dirichlet", seed=4)
    b = partition_by_patient(labels, pids, 3, scheme="dirichlet", seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a.clients, b.clients))


# ------------------------------------------------------------------------------------------ the server
def test_aggregation_is_the_sample_weighted_mean_by_hand():
    u1 = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(4.0)}
    u2 = {"w": torch.tensor([3.0, -2.0]), "b": torch.tensor(0.0)}
    avg = mean_update([u1, u2], [10, 30])
    assert torch.allclose(avg["w"], torch.tensor([(10 * 1 + 30 * 3) / 40, (10 * 2 - 30 * 2) / 40]))
    assert torch.allclose(avg["b"], torch.tensor(1.0))
    bufs = mean_buffers([{"m": torch.tensor([0.0]), "n": torch.tensor(2)},
                            {"m": torch.tensor([4.0]), "n": torch.tensor(5)}], [1, 3])
    assert bufs["m"].item() == 3.0 and bufs["n"].dtype == torch.int64 and bufs["n"].item() == 4


def test_server_step_with_momentum_by_hand():
    model = build("lenet_zhu", 2, 1, 16, seed=0)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    server = Server(model, w0, Settings(server_lr=0.1, server_momentum=0.5))
    g = {k: torch.ones_like(v) for k, v in model.named_parameters()}
    server.step(g, "gradient")
    server.step(g, "gradient")  # v1 = g, v2 = 0.5 g + g
    for k in g:
        assert torch.allclose(server.params[k], w0[k] - 0.1 * 1.0 - 0.1 * 1.5, atol=1e-6)
    # FedAvg: the server adds the averaged weight delta (server_lr 1, no momentum)
    fa = Server(model, w0, Settings())
    fa.step({k: 0.25 * torch.ones_like(v) for k, v in g.items()}, "weight_delta")
    for k in g:
        assert torch.allclose(fa.params[k], w0[k] + 0.25, atol=1e-6)


def _tiny_data(sizes, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.rand(n, 1, size, size, generator=g)
    y = torch.randint(0, 2, (n,), generator=g)
    edges = np.cumsum([0] + list(sizes))
    clients = [np.arange(edges[i], edges[i + 1]) for i in range(len(sizes))]
    return x, y, clients


@pytest.mark.parametrize("sizes", [(6, 6, 6), (3, 7, 5)])
def test_one_round_of_fedsgd_with_all_clients_is_centralised_sgd_on_the_union(sizes):
    x, y, clients = _tiny_data(sizes)
    lr = 0.3
    model = build("convnet", 2, 1, 16, seed=3, options={"width": 4, "depth": 2, "batch_norm": False})
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    st_ = Settings(num_clients=len(sizes), rounds=1, algorithm="fedsgd", local_batch_size=None, server_lr=lr,
                   sends_buffers=False)
    res = simulate(model, x, y, clients, x[:4], y[:4], st_)
    ref = build("convnet", 2, 1, 16, seed=3, options={"width": 4, "depth": 2, "batch_norm": False})
    ref.load_state_dict(w0)
    F.cross_entropy(ref(x), y).backward()
    for n, p in ref.named_parameters():
        assert torch.allclose(res.final_state[n], w0[n] - lr * p.grad, atol=1e-6), n
    assert res.rounds[0]["clients"] == list(range(len(sizes)))
    assert res.rounds[0]["bits"] == len(sizes) * 32 * sum(p.numel() for p in ref.parameters())


def test_fedavg_round_equals_the_weighted_mean_of_client_updates():
    from gradleak.federated import Protocol, client_update

    x, y, clients = _tiny_data((4, 8))
    model = build("lenet_zhu", 2, 1, 16, seed=1)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    st_ = Settings(num_clients=2, rounds=1, local_lr=0.1, local_batch_size=None, local_steps=2)
    res = simulate(model, x, y, clients, x[:4], y[:4], st_, seed=5)
    # replay the clients by hand: the round's data order is a permutation drawn after client sampling
    rng = np.random.default_rng(5)
    rng.choice(2, 2, replace=False)
    deltas = []
    for idx in clients:
        order = idx[rng.permutation(len(idx))]
        u, _ = client_update(model, w0, x[order], y[order], Protocol("fedavg", local_steps=2, local_lr=0.1))
        deltas.append(u)
    for n in deltas[0]:
        want = w0[n] + (4 * deltas[0][n] + 8 * deltas[1][n]) / 12
        assert torch.allclose(res.final_state[n], want, atol=1e-6), n


def test_simulation_is_deterministic_and_samples_clients_as_configured():
    x, y, clients = _tiny_data((5, 5, 5, 5))
    model = build("lenet_zhu", 2, 1, 16, seed=0)

    def run(seed, **kw):
        st_ = Settings(num_clients=4, rounds=3, clients_per_round=0.5, local_lr=0.05, local_batch_size=2, **kw)
        return simulate(model, x, y, clients, x[:6], y[:6], st_, seed=seed)

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(a.final_state[k], b.final_state[k]) for k in a.final_state)
    assert [r["clients"] for r in a.rounds] == [r["clients"] for r in b.rounds]
    assert any(not torch.equal(a.final_state[k], c.final_state[k]) for k in a.final_state)
    assert all(len(r["clients"]) == 2 for r in a.rounds)
    p = run(1, client_sampling="poisson")
    assert Settings(num_clients=4, clients_per_round=0.5, client_sampling="poisson").sample_rate == 0.5
    assert all(set(r["clients"]) <= {0, 1, 2, 3} for r in p.rounds)


def test_a_client_runner_gets_the_rounds_jobs_and_its_uploads_drive_the_same_loop():
    from gradleak.federated import client_update

    x, y, clients = _tiny_data((5, 3, 6, 4))
    model = build("lenet_zhu", 2, 1, 16, seed=0)
    st_ = Settings(num_clients=4, rounds=3, clients_per_round=0.6, client_sampling="poisson", local_lr=0.05,
                   local_batch_size=2, class_balanced=True)
    dense = 32 * sum(p.numel() for p in model.parameters())
    seen = []

    def run_clients(r, state, jobs):  # the clients elsewhere: the same computation, without obfuscation
        seen.append((r, jobs))
        out = Uploads(update_is="weight_delta")
        for job in jobs:
            sel = clients[job.client][job.positions]
            update, _ = client_update(model, state, x[sel], y[sel], job.protocol)
            out.updates.append(update)
            out.weights.append(job.weight)
            out.buffers.append({})
            out.bits.append(dense)
            out.records.append([])
        return out

    here = simulate(model, x, y, clients, x[:6], y[:6], st_, seed=2)
    there = simulate(model, x, y, clients, x[:6], y[:6], st_, seed=2, run_clients=run_clients)
    assert [r for r, _ in seen] == [1, 2, 3]
    assert [[j.client for j in jobs] for _, jobs in seen] == [r["clients"] for r in here.rounds]
    for _, jobs in seen:
        for job in jobs:  # a class-balanced draw of the client's own images, weighted by its image count
            assert job.weight == len(clients[job.client]) and len(job.positions) == len(clients[job.client])
            assert set(job.positions.tolist()) <= set(range(len(clients[job.client])))
            assert job.observed.num_images == len(job.positions) and job.protocol.local_lr == 0.05
    assert all(torch.equal(here.final_state[k], there.final_state[k]) for k in here.final_state)
    assert [r["bits"] for r in here.rounds] == [r["bits"] for r in there.rounds]
    assert [r["roc_auc"] for r in here.rounds] == [r["roc_auc"] for r in there.rounds]


def test_early_stopping_and_best_round():
    x, y, clients = _tiny_data((6, 6))
    model = build("lenet_zhu", 2, 1, 16, seed=0)
    st_ = Settings(num_clients=2, rounds=6, local_lr=0.05)
    # no later round can beat round 1 by min_delta 10, so training stops after `patience` more rounds
    res = simulate(model, x, y, clients, x, y, st_, evaluation=Evaluation(patience=2, min_delta=10.0))
    assert res.stopped_early and len(res.rounds) == 3 and res.best_round == 1
    assert res.best["roc_auc"] == res.rounds[0]["roc_auc"] and res.best["num_images"] == res.rounds[0]["eval_images"]
    # evaluation every 2 rounds still evaluates the last one
    res = simulate(model, x, y, clients, x, y, Settings(num_clients=2, rounds=3, local_lr=0.05),
                   evaluation=Evaluation(every=2, monitor="loss"))
    assert ["roc_auc" in r for r in res.rounds] == [False, True, True]


def test_class_balanced_order_sees_both_classes_equally_often():
    rng = np.random.default_rng(0)
    y = np.array([1] * 90 + [0] * 10)
    draws = np.concatenate([y[_client_order(rng, y, True)] for _ in range(200)])
    assert abs(draws.mean() - 0.5) < 0.02
    plain = _client_order(rng, y, False)
    assert sorted(plain.tolist()) == list(range(100))


def test_dp_schedule_is_filled_from_the_simulation():
    specs = [{"name": "gaussian", "target_epsilon": 8.0, "delta": 1e-5}, {"name": "qsgd"}]
    out = schedule_dp(specs, 0.5, 20)
    assert out[0]["sample_rate"] == 0.5 and out[0]["rounds"] == 20 and "rounds" not in out[1]
    assert "rounds" not in specs[0]  # the caller's specs are not modified
    assert schedule_dp([{**specs[0], "rounds": 20}], 0.5, 20)[0]["rounds"] == 20
    with pytest.raises(UserError, match="rounds=10"):
        schedule_dp([{**specs[0], "rounds": 10}], 0.5, 20)


def test_settings_errors_are_one_line_user_errors():
    for bad, frag in [({"rounds": 0}, "rounds"), ({"clients_per_round": 1.5}, "clients_per_round"),
                      ({"algorithm": "fedprox"}, "algorithm"), ({"server_momentum": 1.0}, "momentum"),
                      ({"client_sampling": "x"}, "client_sampling"), ({"local_lr": 0.0}, "local_lr")]:
        with pytest.raises(UserError, match=frag):
            Settings(**bad)
    with pytest.raises(UserError, match="monitor"):
        Evaluation(monitor="auc")


def test_a_model_with_nan_weights_or_a_diverged_client_stops_the_run_with_one_line():
    x, y, clients = _tiny_data((5, 5))
    st_ = Settings(num_clients=2, rounds=2, local_lr=0.05, local_batch_size=2)
    poisoned = build("lenet5", 2, 1, 16, seed=0)
    with torch.no_grad():
        poisoned.fc1.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match=r"^round 1: client \d: the model the server sent has NaN or Inf entries in "
                                        r"'fc1\.weight'$"):
        simulate(poisoned, x, y, clients, x[:4], y[:4], st_, seed=0)
    with pytest.raises(UserError, match=r"^round 1: client \d: the client's update of '[\w.]+' has NaN or Inf "
                                        r"entries: its local training diverged"):
        simulate(build("lenet5", 2, 1, 16, seed=0), x, y, clients, x[:4], y[:4],
                 Settings(num_clients=2, rounds=2, local_lr=1e30, local_batch_size=2), seed=0)


def test_epsilon_per_round_matches_opacus_for_the_schedule():
    from opacus.accountants import RDPAccountant

    x, y, clients = _tiny_data((4, 4, 4, 4))
    model = build("lenet_zhu", 2, 1, 16, seed=0)
    st_ = Settings(num_clients=4, rounds=5, clients_per_round=0.5, local_lr=0.05)  # 2 of 4 clients: q = 0.5
    dp = {"name": "gaussian", "clip": 1.0, "target_epsilon": 3.0, "delta": 1e-5}
    res = simulate(model, x, y, clients, x[:4], y[:4], st_, obfuscations=[dp], seed=0)
    rec = res.obfuscation[0]
    assert rec["sample_rate"] == 0.5 and rec["rounds"] == 5 and rec["dp_unit"] == "client"
    z = rec["noise_multiplier"]
    acc = RDPAccountant()
    for r in res.rounds:
        acc.step(noise_multiplier=z, sample_rate=0.5)
        assert r["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9), r["round"]
    assert 3.0 - 0.011 <= res.rounds[-1]["epsilon"] <= 3.0 + 1e-9  # the target, to Opacus's search precision
    assert [r["epsilon"] for r in res.rounds] == sorted(r["epsilon"] for r in res.rounds)
    # a fixed noise multiplier is accounted too; compression alone spends no privacy
    fixed = simulate(model, x, y, clients, x[:4], y[:4], st_, seed=0,
                     obfuscations=[{"name": "gaussian", "clip": 1.0, "noise_multiplier": 2.0}])
    acc = RDPAccountant()
    for _ in range(5):
        acc.step(noise_multiplier=2.0, sample_rate=0.5)
    assert fixed.rounds[-1]["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), rel=1e-9)
    q = simulate(model, x, y, clients, x[:4], y[:4], st_, seed=0, obfuscations=[{"name": "qsgd", "levels": 4}])
    assert all(r["epsilon"] is None for r in q.rounds)
    dense = 32 * sum(p.numel() for p in model.parameters())
    assert 0 < q.bits_per_update < dense and all(r["bits"] < 2 * dense for r in q.rounds)


def test_obfuscation_noise_is_drawn_from_the_seed():
    x, y, clients = _tiny_data((4, 4))
    model = build("lenet_zhu", 2, 1, 16, seed=0)
    st_ = Settings(num_clients=2, rounds=2, local_lr=0.05)
    spec = [{"name": "gaussian", "sigma": 0.01}]
    a = simulate(model, x, y, clients, x, y, st_, obfuscations=spec, seed=3)
    b = simulate(model, x, y, clients, x, y, st_, obfuscations=spec, seed=3)
    c = simulate(model, x, y, clients, x, y, st_, obfuscations=spec, seed=4)
    assert all(torch.equal(a.final_state[k], b.final_state[k]) for k in a.final_state)
    assert any(not torch.equal(a.final_state[k], c.final_state[k]) for k in a.final_state)
