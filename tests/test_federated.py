import pytest
import torch
import torch.nn.functional as F

from gradleak.errors import UserError
from gradleak.federated import ObservedProtocol, Protocol, client_update
from gradleak.federated.protocol import minibatches
from gradleak.models import build


def _batch(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, size, size, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_fedsgd_is_the_mean_cross_entropy_gradient():
    model = build("lenet5", 2, 1, 16, seed=1)
    x, y = _batch()
    update, _ = client_update(model, model.state_dict(), x, y, Protocol())
    ref = build("lenet5", 2, 1, 16, seed=1)
    F.cross_entropy(ref(x), y).backward()
    assert list(update) == [n for n, _ in ref.named_parameters()]
    for n, p in ref.named_parameters():
        assert torch.allclose(update[n], p.grad, atol=1e-6), n


def test_fedavg_equals_hand_computed_two_steps_and_never_mutates():
    model = build("lenet_zhu", 2, 1, 16, seed=2)
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch(4)
    lr = 0.05
    proto = Protocol(algorithm="fedavg", local_steps=2, local_lr=lr, local_batch_size=2)
    update, _ = client_update(model, sent, x, y, proto)
    # the weights the server sent, and the template's own, are untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, sent[k])
    # by hand: two SGD steps on mini-batches [0:2] then [2:4]
    ref = build("lenet_zhu", 2, 1, 16, seed=2)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    for sl in (slice(0, 2), slice(2, 4)):
        opt.zero_grad()
        F.cross_entropy(ref(x[sl]), y[sl]).backward()
        opt.step()
    for n, p in ref.named_parameters():
        assert torch.allclose(update[n], p.detach() - sent[n], atol=1e-6), n


def test_minibatches_cycle_in_order():
    assert minibatches(5, 2, 4) == [slice(0, 2), slice(2, 4), slice(4, 5), slice(0, 2)]
    assert minibatches(3, None, 2) == [slice(0, 3), slice(0, 3)]


def test_batch_norm_buffers_travel_separately():
    model = build("convnet", 2, 1, 16, seed=0, options={"width": 4, "depth": 2})
    sent = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch(4)
    update, buffers = client_update(model, sent, x, y, Protocol(sends_buffers=True))
    assert all("running" not in k for k in update)
    assert "body.1.running_mean" in buffers
    # running mean moved towards the batch mean (momentum 0.1) while the sent state stayed put
    assert not torch.equal(buffers["body.1.running_mean"], sent["body.1.running_mean"])
    assert torch.equal(model.state_dict()["body.1.running_mean"], sent["body.1.running_mean"])


def test_mean_update_accumulates_in_float64_and_keeps_the_dtype():
    from gradleak.federated.arithmetic import mean_buffers, mean_update

    ups = [{"w": torch.tensor([1e8], dtype=torch.float32)}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([-1e8])}]
    # float32 accumulation would give 0: 1e8 + 1 rounds back to 1e8
    assert mean_update(ups)["w"].item() == pytest.approx(1 / 3) and mean_update(ups)["w"].dtype == torch.float32
    weighted = mean_update([{"w": torch.tensor([2.0])}, {"w": torch.tensor([6.0])}], [3, 1])
    assert weighted["w"].item() == 3.0
    bufs = mean_buffers([{"m": torch.tensor([1.0]), "n": torch.tensor(3)},
                         {"m": torch.tensor([2.0]), "n": torch.tensor(3)}])
    assert bufs["m"].item() == 1.5 and bufs["n"].dtype == torch.int64 and bufs["n"].item() == 3
    with pytest.raises(ValueError):
        mean_update([])


def test_the_fedavg_scales_are_inverse_and_one_for_fedsgd():
    from gradleak.federated.arithmetic import fedavg_delta_scale, fedavg_gradient_scale

    p = Protocol("fedavg", local_steps=4, local_lr=0.05)
    assert fedavg_gradient_scale(p) == pytest.approx(-5.0) and fedavg_delta_scale(p) == pytest.approx(-0.2)
    assert fedavg_gradient_scale(p) * fedavg_delta_scale(p) == pytest.approx(1.0)
    assert fedavg_gradient_scale(Protocol()) == fedavg_delta_scale(Protocol()) == 1.0
    # a FedAvg delta of one full-batch step read as a gradient is the FedSGD gradient
    model = build("lenet_zhu", 2, 1, 16, seed=3)
    x, y = _batch(2)
    delta, _ = client_update(model, model.state_dict(), x, y, Protocol("fedavg", local_steps=1, local_lr=1e-3))
    grad, _ = client_update(model, model.state_dict(), x, y, Protocol())
    scale = fedavg_gradient_scale(Protocol("fedavg", local_steps=1, local_lr=1e-3))
    for n in grad:
        assert torch.allclose(delta[n] * scale, grad[n], atol=1e-5), n


def test_an_observed_protocol_is_canonical():
    fedsgd = Protocol(local_steps=3, local_lr=0.5).observed(4)
    assert (fedsgd.local_steps, fedsgd.local_lr) == (1, 0.0)
    full = Protocol("fedavg", local_steps=2, local_lr=0.1, local_batch_size=4).observed(4)
    assert full.local_batch_size is None and full.header()["local_batch_size"] == 4
    assert full == ObservedProtocol.from_header(full.header())
    assert Protocol.from_header(full.header()) == Protocol("fedavg", local_steps=2, local_lr=0.1)
    with pytest.raises(UserError, match="cannot be split evenly"):
        Protocol(num_clients_averaged=2).observed(3)
