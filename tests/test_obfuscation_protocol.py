"""Protocol-level obfuscations (per-example clipping, K-client averaging) on both sides of the seam, the
experiment config's obfuscation list, and the CLI surface (capture --obfuscation, obfuscate)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cli import assert_user_error, gradleak

from factories import tiny_batch
from gradleak import observation
from gradleak.attacks.simulate import Simulator
from gradleak.capture import capture
from gradleak.errors import UserError
from gradleak.experiment import config
from gradleak.federated import Protocol, client_update
from gradleak.federated.protocol import client_slices, split_state
from gradleak.models import build


def _close(a, b, tol=1e-5):
    return all(torch.allclose(a[n], b[n], atol=tol, rtol=1e-4) for n in a)


# ------------------------------------------------------------------------------ per-example clipping
def test_per_example_clipping_matches_a_loop_over_images_and_bounds_each_contribution():
    x, y = tiny_batch(3, 16)
    model = build("lenet_zhu", 2, 1, 16, seed=0)
    params, buffers = split_state(model, {k: v.detach() for k, v in model.state_dict().items()})
    clip = 0.05
    update, _ = client_update(model, model.state_dict(), x, y, Protocol(per_example_clip=clip))
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(3):  # plain autograd, one image at a time
        g = torch.autograd.grad(F.cross_entropy(model(x[i:i + 1]), y[i:i + 1]), list(model.parameters()))
        norm = math.sqrt(sum(float(t.double().norm()) ** 2 for t in g))
        assert norm > clip  # the case exercises clipping
        factor = min(1.0, clip / (norm + 1e-6))
        for (n, _), t in zip(model.named_parameters(), g):
            expected[n] += t * factor / 3
    assert _close(update, expected, 1e-6)
    total = math.sqrt(sum(float(v.double().norm()) ** 2 for v in update.values()))
    assert total <= clip * (1 + 1e-5)
    # a huge clip norm changes nothing
    plain, _ = client_update(model, model.state_dict(), x, y, Protocol())
    loose, _ = client_update(model, model.state_dict(), x, y, Protocol(per_example_clip=1e6))
    assert _close(plain, loose, 1e-6)


def test_per_example_clipping_is_recorded_and_simulated_by_the_attacker():
    obs, truth = _capture(Protocol(per_example_clip=0.05), n=3)
    assert obs.protocol.per_example_clip == 0.05
    sim = Simulator(obs)
    assert sim.protocol.per_example_clip == 0.05
    assert _close(sim.update(truth[0], truth[1]), obs.update, 1e-6)
    # differentiable in the images, as the attack needs (and under vmap over restarts)
    xs = truth[0].unsqueeze(0).repeat(2, 1, 1, 1, 1).requires_grad_(True)
    loss = sim.batched(lambda u, xr: sum((u[n] - sim.target[n]).pow(2).sum() for n in u), xs, truth[1])
    loss.sum().backward()
    assert xs.grad is not None and torch.isfinite(xs.grad).all()


def test_per_example_clipping_needs_a_model_without_batchnorm():
    x, y = tiny_batch(2, 16)
    model = build("convnet", 2, 1, 16, seed=0)
    with pytest.raises(UserError, match="BatchNorm"):
        client_update(model, model.state_dict(), x, y, Protocol(per_example_clip=1.0))


def test_gaussian_after_per_example_clipping_uses_the_per_image_sensitivity():
    obs, _ = _capture(Protocol(per_example_clip=2.0), n=4,
                      obfuscations=[{"name": "gaussian", "noise_multiplier": 0.5}])
    r = obs.obfuscation[0]
    assert r["sensitivity"] == pytest.approx(2.0 / 4) and r["sigma"] == pytest.approx(0.25)
    assert r["dp_unit"] == "example" and r["epsilon"] > 0
    with pytest.raises(UserError, match="fedavg"):
        _capture(Protocol(algorithm="fedavg", local_lr=0.1, per_example_clip=2.0), n=2,
                 obfuscations=[{"name": "gaussian", "noise_multiplier": 0.5}])


# ---------------------------------------------------------------------------------- K clients averaged
def _capture(protocol, n=4, **kw):
    images, labels = tiny_batch(n, 16)
    obs, _ = capture(images, labels, arch="lenet_zhu", protocol=protocol, labels_known=True, **kw)
    return obs, (images, labels)


@pytest.mark.parametrize("algorithm", ["fedsgd", "fedavg"])
def test_k_clients_averaged_is_the_mean_of_the_client_updates_and_the_simulator_agrees(algorithm):
    kw = {"local_lr": 0.1, "local_steps": 2} if algorithm == "fedavg" else {}
    proto = Protocol(algorithm=algorithm, num_clients_averaged=2, **kw)
    obs, (x, y) = _capture(proto, n=4)
    assert obs.protocol.num_clients_averaged == 2 and obs.protocol.num_images == 4
    assert obs.protocol.images_per_client == 2 and obs.protocol.header()["local_batch_size"] == 2
    model = build("lenet_zhu", 2, 1, 16, seed=0)
    one = Protocol(algorithm=algorithm, **kw)
    parts = [client_update(model, obs.global_state, x[s], y[s], one)[0] for s in client_slices(4, 2)]
    mean = {n: (parts[0][n] + parts[1][n]) / 2 for n in parts[0]}
    assert _close(obs.update, mean, 1e-7)
    whole, _ = client_update(model, obs.global_state, x, y, one)
    if algorithm == "fedavg":  # not the same as one client on all four images
        assert not _close(obs.update, whole, 1e-7)
    sim = Simulator(obs)
    assert _close(sim.update(x, y), obs.update, 1e-6)


def test_each_client_obfuscates_its_own_update(tmp_path):
    proto = Protocol(num_clients_averaged=2)
    obs, (x, y) = _capture(proto, n=4, obfuscations=["topk:keep=0.1", "relative_gaussian:sigma0=0.1"],
                           obfuscation_seed=3)
    top, noise = obs.obfuscation
    assert top["name"] == "topk" and noise["name"] == "relative_gaussian"
    assert len(noise["per_client"]) == 2 and noise["sigma_of_mean"] == pytest.approx(noise["sigma"] / math.sqrt(2))
    sigmas = [c["sigma"] for c in noise["per_client"]]
    assert noise["sigma"] == pytest.approx(math.sqrt((sigmas[0] ** 2 + sigmas[1] ** 2) / 2))
    # the file round-trips and validates
    observation.save(obs, tmp_path / "o.pt")
    assert observation.load(tmp_path / "o.pt").obfuscation == obs.obfuscation


def test_observation_validation_of_the_new_protocol_keys(tmp_path):
    obs, _ = _capture(Protocol(num_clients_averaged=2), n=4)
    raw = obs.to_dict()
    for key, value, fragment in [("num_clients_averaged", 3, "num_clients_averaged"),
                                 ("images_per_client", 3, "images_per_client"),
                                 ("per_example_clip", -1.0, "per_example_clip")]:
        bad = {**raw, "protocol": {**raw["protocol"], key: value}}
        with pytest.raises(UserError, match=fragment):
            observation.validate(bad, "x.pt")
    # files written before these keys existed still load (K = 1, no clipping)
    old = {**raw, "protocol": {k: v for k, v in raw["protocol"].items()
                               if k not in ("num_clients_averaged", "images_per_client", "per_example_clip")}}
    old["protocol"]["local_batch_size"] = 4
    observation.validate(old)
    assert Protocol.from_header(old["protocol"]) == Protocol()


# ---------------------------------------------------------------------------------------------- config
def test_config_accepts_obfuscation_dicts_strings_and_rog_keys_and_rejects_bad_ones():
    cfg = config.from_dict({"capture": {"obfuscation": [{"compress": "qsgd", "quant_level": 16},
                                                        {"compress": "topk", "sparsity": 0.99},
                                                        "gaussian:clip=1,noise_multiplier=0.01"],
                                        "protocol": {"num_clients_averaged": 2, "per_example_clip": 1.0}}})
    assert len(cfg["capture"]["obfuscation"]) == 3
    assert Protocol(**cfg["capture"]["protocol"]).num_clients_averaged == 2
    with pytest.raises(UserError, match="capture.obfuscation: obfuscation 'qsgd': levels"):
        config.from_dict({"capture": {"obfuscation": [{"name": "qsgd", "levels": 1}]}}, source="exp.yaml")


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_capture_with_obfuscation_then_obfuscate_appends(tmp_path):
    obs = tmp_path / "cap" / "obs.pt"
    p = gradleak("capture", "--size", 16, "--arch", "lenet_zhu", "--batch-size", 2, "--num-clients-averaged", 2,
                 "--obfuscation", "qsgd:levels=4", "--obfuscation", "topk:keep=0.5", "--seed", 1, "--out", obs)
    assert "2 clients x 2 images averaged" in p.stdout and "qsgd, topk" in p.stdout
    o = observation.load(obs)
    assert [r["name"] for r in o.obfuscation] == ["qsgd", "topk"] and o.num_images == 4
    assert np.load(tmp_path / "cap" / "truth.npz")["images"].shape == (4, 1, 16, 16)
    out = tmp_path / "obs2.pt"
    p = gradleak("obfuscate", "--observation", obs, "--spec", "sign", "--spec", "uniform:bits=4", "--out", out,
                 "--seed", 2)
    o2 = observation.load(out)
    assert [r["name"] for r in o2.obfuscation] == ["qsgd", "topk", "sign", "uniform"]
    assert o2.obfuscation[3]["bits"] == 4
    # the update is what the specs make of the stored one: sign then 4-bit rounding of +-1 is +-1
    assert all(set(v.abs().unique().tolist()) == {1.0} for v in o2.update.values())
    # the input file is untouched; the attack runs on the result
    assert [r["name"] for r in observation.load(obs).obfuscation] == ["qsgd", "topk"]
    gradleak("attack", "--observation", out, "--out", tmp_path / "a", "--iterations", 2, "--restarts", 1, "--quiet")


def test_cli_obfuscation_errors_are_one_line_exit_2_and_write_nothing(tmp_path):
    # (every parameter check is unit-tested in test_obfuscation.py; here: that the CLI reports them)
    obs = tmp_path / "obs.pt"
    gradleak("capture", "--size", 16, "--arch", "lenet_zhu", "--out", obs)
    out = tmp_path / "out.pt"
    assert_user_error(gradleak("obfuscate", "--observation", obs, "--spec", "sign", "--spec", "qsgd:levels=1",
                               "--out", out, check=False), "obfuscation 'qsgd': levels must be an integer >= 2")
    assert_user_error(gradleak("obfuscate", "--observation", obs, "--spec", "topk:keep", "--out", out,
                               check=False), "expected key=value")
    assert_user_error(gradleak("obfuscate", "--observation", tmp_path / "nope.pt", "--spec", "sign", "--out", out,
                               check=False), "nope.pt")
    assert_user_error(gradleak("capture", "--size", 16, "--obfuscation", "gaussian:clip=1,noise_multiplier=-0.5",
                               "--out", tmp_path / "c" / "o.pt", check=False), "noise_multiplier must be")
    assert_user_error(gradleak("capture", "--size", 16, "--arch", "convnet", "--per-example-clip", "1",
                               "--out", tmp_path / "c" / "o.pt", check=False), "BatchNorm")
    assert not out.exists() and not (tmp_path / "c").exists()
