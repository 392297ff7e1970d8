"""The attack suite: DLG/iDLG, ROG, batched L-BFGS, FedAvg unrolling, BN prior, presets, post-processing."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradleak.attacks import apply_postprocessing, names, preset, resolve_settings, run_attack
from gradleak.attacks import bn_prior
from gradleak.attacks import labels as label_inference
from gradleak.attacks.decoders import Bicubic, build as build_decoder
from gradleak.attacks.objectives import cosine, cosine_matching, l2, l2_matching
from gradleak.attacks.optim import BatchedLBFGS
from gradleak.attacks.simulate import Simulator
from gradleak.attacks.unroll import assume_fedsgd
from gradleak.capture import Truth, capture
from gradleak.data import load_dataset
from gradleak.errors import UserError
from gradleak.experiment.outputs import write_reconstruction
from gradleak.federated import Protocol, client_update
from gradleak.metrics import score
from gradleak.models import build

from factories import tiny_batch, tiny_observation


# ------------------------------------------------------------------------------------------------ DLG
def test_dlg_recovers_the_sigmoid_lenet_single_image_with_joint_soft_labels():
    b = load_dataset("phantoms", size=16).batch([3])
    obs, _ = capture(b.images, b.labels, arch="lenet_zhu", protocol=Protocol())
    rec = run_attack("dlg", obs, {"iterations": 60, "restarts": 1}, seed=0, progress=False)
    assert rec.threat_model["labels"] == "joint" and rec.extras["soft_labels"].shape == (1, 2)
    m = score(b.images, b.labels, rec.images, rec.labels)
    assert m["label_accuracy"] == 1.0
    assert m["psnr"] > 30.0, m["psnr"]


def test_idlg_preset_reads_the_label_instead_of_optimising_it():
    obs, truth = tiny_observation("lenet_zhu", n=1, labels_known=False)
    rec = run_attack("idlg", obs, {"iterations": 2, "restarts": 2}, progress=False)
    assert rec.threat_model["labels"] == "idlg" and rec.labels.tolist() == truth.labels.tolist()
    assert "soft_labels" not in rec.extras


def test_count_based_labels_are_exact_with_a_bias_on_known_batches():
    # lenet_zhu's last layer has a bias: its gradient is (1/B) sum_i (p_i - onehot(y_i)) exactly
    ds = load_dataset("phantoms", size=16)
    for seed, idx in enumerate([[0, 1, 2, 3], [5, 6, 7, 8, 9, 10], [11, 12]]):
        b = ds.batch(idx)
        obs, _ = capture(b.images, b.labels, arch="lenet_zhu", num_classes=3, protocol=Protocol(),
                         model_seed=seed)
        y, method = label_inference.infer(Simulator(obs), None)
        assert method == "count" and sorted(y.tolist()) == sorted(b.labels.tolist())


# ------------------------------------------------------------------------------------------- L-BFGS
def _rosenbrock(p):  # R x 2
    return (1 - p[:, 0]) ** 2 + 100 * (p[:, 1] - p[:, 0] ** 2) ** 2


def test_batched_lbfgs_runs_each_restart_exactly_like_torch_lbfgs():
    starts = torch.tensor([[-1.2, 1.0], [0.5, -0.3], [2.0, 2.0]], dtype=torch.float64)
    p = starts.clone().requires_grad_(True)
    opt = BatchedLBFGS([p], lr=0.5, history_size=5)

    def closure():
        p.grad = None
        f = _rosenbrock(p)
        f.sum().backward()
        return f

    for _ in range(25):
        opt.step(closure)
    for r in range(len(starts)):
        q = starts[r:r + 1].clone().requires_grad_(True)
        ref = torch.optim.LBFGS([q], lr=0.5, max_iter=1, history_size=5, tolerance_grad=0, tolerance_change=0)

        def closure_ref():
            ref.zero_grad()
            f = _rosenbrock(q).sum()
            f.backward()
            return f

        for _ in range(25):
            ref.step(closure_ref)
        assert torch.allclose(p.detach()[r], q.detach()[0], rtol=1e-7, atol=1e-7), r


def test_batched_lbfgs_freezes_a_diverged_restart_without_touching_the_others():
    p = torch.tensor([[1.0], [2.0]], requires_grad=True)
    opt = BatchedLBFGS([p], lr=0.1)

    def closure():
        p.grad = None
        f = p[:, 0] ** 2
        f = torch.stack([f[0], f[1] * float("nan")])
        f.sum().backward()
        return f

    for _ in range(3):
        opt.step(closure)
    assert opt.active.tolist() == [True, False]
    assert p[1].item() == 2.0 and p[0].item() < 1.0


# ----------------------------------------------------------------------------------------------- ROG
def test_bicubic_decoder_has_a_quarter_resolution_latent_and_reproduces_constants():
    d = build_decoder("bicubic", (1, 64, 64), 4)
    assert isinstance(d, Bicubic) and d.latent_shape == (1, 16, 16)
    z = torch.full((3, 2, 1, 16, 16), 0.3)
    assert d(z).shape == (3, 2, 1, 64, 64) and torch.allclose(d(z), torch.full_like(d(z), 0.3))
    assert build_decoder("bicubic", (1, 32, 32), 1).latent_shape == (1, 32, 32)


def test_rog_optimises_the_low_resolution_latent():
    obs, truth = tiny_observation("lenet5", n=1, size=16)
    rec = run_attack("rog", obs, {"iterations": 15, "restarts": 2}, progress=False)
    assert rec.extras["latent"].shape == (1, 1, 4, 4)
    assert rec.images.shape == (1, 1, 16, 16) and 0 <= rec.images.min() and rec.images.max() <= 1
    # the image is exactly the bicubic upsampling of the latent (before clipping to [0, 1])
    up = build_decoder("bicubic", (1, 16, 16), 4)(rec.extras["latent"]).clamp(0, 1)
    assert torch.allclose(up, rec.images, atol=1e-6)
    first, last = rec.history[0][1], rec.loss
    assert last < first


def test_postprocessing_hook_reports_with_and_without(tmp_path):
    obs, truth = tiny_observation("lenet_zhu", n=2)
    calls = []

    def smooth(images, labels):
        calls.append((images.shape, labels.tolist()))
        return torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1, count_include_pad=False)

    rec = run_attack("rog", obs, {"iterations": 3, "restarts": 1}, progress=False, postprocess=smooth)
    raw = rec.extras["without_postprocessing"]
    assert calls == [((2, 1, 16, 16), rec.labels.tolist())]
    assert torch.allclose(rec.images, smooth(raw, rec.labels)) and not torch.equal(rec.images, raw)
    assert rec.threat_model["postprocessing"] == "smooth"
    metrics = write_reconstruction(tmp_path, rec, truth)
    z = np.load(tmp_path / "reconstruction.npz")
    assert np.allclose(z["images_without_postprocessing"], raw.numpy())
    direct = score(truth.images, truth.labels, raw, rec.labels)
    assert metrics["without_postprocessing"]["psnr"] == pytest.approx(direct["psnr"])
    assert metrics["psnr"] == pytest.approx(score(truth.images, truth.labels, rec.images, rec.labels)["psnr"])
    with pytest.raises(ValueError, match="shape"):
        apply_postprocessing(rec, lambda x, y: x[:1])


# ------------------------------------------------------------------------------------- FedAvg unroll
def test_fedavg_unroll_reproduces_the_clients_weight_delta_exactly():
    images, labels = tiny_batch(3, 16, seed=2)
    for proto in (Protocol("fedavg", local_steps=5, local_lr=0.05),
                  Protocol("fedavg", local_steps=4, local_lr=0.1, local_batch_size=2)):
        model = build("lenet5", 2, 1, 16, seed=1)
        sent = {k: v.clone() for k, v in model.state_dict().items()}
        delta, _ = client_update(model, sent, images, labels, proto)
        # the client really trained: its delta is not one gradient step
        g, _ = client_update(model, sent, images, labels, Protocol())
        assert not torch.allclose(delta["fc1.weight"], -proto.local_lr * proto.local_steps * g["fc1.weight"],
                                  atol=1e-7)
        obs, _ = capture(images, labels, arch="lenet5", protocol=proto, model_seed=1)
        sim = Simulator(obs)
        again = sim.update(images, labels)
        for k in delta:
            assert torch.allclose(again[k], delta[k], rtol=1e-5, atol=1e-7), k
        assert all(torch.equal(obs.global_state[k], sent[k]) for k in sent)


def test_reading_the_delta_as_one_gradient_step():
    images, labels = tiny_batch(2, 16)
    proto = Protocol("fedavg", local_steps=3, local_lr=0.01)
    obs, _ = capture(images, labels, arch="lenet_zhu", protocol=proto)
    sim = assume_fedsgd(Simulator(obs))
    assert sim.protocol.algorithm == "fedsgd"
    g = sim.update(images, labels)
    # with a small learning rate the delta is about -lr * steps * gradient
    assert cosine(g, sim.target).item() < 1e-3
    rec = run_attack("ig", obs, {"iterations": 2, "restarts": 1, "unroll_local_steps": False}, progress=False)
    assert rec.threat_model["local_steps"] == "read as one gradient step"
    rec = run_attack("ig", obs, {"iterations": 2, "restarts": 1}, progress=False)
    assert rec.threat_model["local_steps"] == "unrolled"


def test_an_aware_objective_reads_a_delta_taken_as_a_gradient_in_the_records_units():
    # one local step: the delta is exactly -lr * gradient, so the truth's gradient lies in every rounding cell
    from gradleak.attacks.aware import for_observation
    from gradleak.attacks.unroll import in_delta_units

    images, labels = tiny_batch(2, 16)
    obs, _ = capture(images, labels, arch="lenet_zhu", protocol=Protocol("fedavg", local_steps=1, local_lr=0.1),
                     obfuscations=[{"name": "uniform", "bits": 4}])
    sim = Simulator(obs)
    matching = for_observation(obs, sim.target, "cosine", knows=True, settings=preset("ig"))
    assert matching.name == "rounding-cell distance"
    sim = assume_fedsgd(sim)
    g = sim.update(images, labels)
    # inside the cells only the small pull to the centre remains (weight 0.01 x at most 0.5^2)
    assert in_delta_units(matching, -0.1)(g).item() <= 0.01 * 0.25 + 1e-6
    assert matching(g).item() > 1.0  # the gradient compared as if it were the delta: far outside the cells


# ------------------------------------------------------------------------------------------ BN prior
@pytest.mark.parametrize("proto", [Protocol(sends_buffers=True), Protocol("fedavg", 1, 0.1, sends_buffers=True)])
def test_bn_statistics_are_recovered_exactly_from_one_forward_pass(proto):
    images, labels = tiny_batch(3, 16)
    obs, _ = capture(images, labels, arch="convnet", protocol=proto, labels_known=True)
    sim = Simulator(obs)
    prior = bn_prior.BNPrior(obs, sim)
    stats = bn_prior.batch_statistics(sim, images)
    assert len(stats) == len(prior.names) >= 2
    for (m, v, _), (tm, tv) in zip(stats, prior.recovered([n for _, _, n in stats])):
        assert torch.allclose(m, tm, atol=1e-5) and torch.allclose(v, tv, atol=1e-5)
    assert prior(images).item() < 1e-4 < prior(torch.rand_like(images)).item()


def test_bn_prior_is_used_only_when_statistics_were_sent():
    images, labels = tiny_batch(2, 16)
    sent, _ = capture(images, labels, arch="convnet", protocol=Protocol(sends_buffers=True))
    kept, _ = capture(images, labels, arch="convnet", protocol=Protocol())
    s = {"iterations": 2, "restarts": 1, "bn_prior_weight": 0.01}
    assert run_attack("ig", sent, s, progress=False).threat_model["bn_statistics"] == "used"
    assert run_attack("ig", kept, s, progress=False).threat_model["bn_statistics"] == "not sent"
    assert run_attack("ig", sent, {**s, "bn_prior_weight": 0}, progress=False).threat_model["bn_statistics"] \
        == "available, unused"


# --------------------------------------------------------------------------------------- objectives
@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.1, 10.0))
def test_bound_objectives_equal_their_definitions(seed, scale):
    g = torch.Generator().manual_seed(seed)
    t = {"a": torch.randn(3, 4, generator=g), "b": torch.randn(50, generator=g)}
    s = {k: v * scale + torch.randn(v.shape, generator=g) for k, v in t.items()}
    flat_t = torch.cat([v.reshape(-1) for v in t.values()])
    flat_s = torch.cat([v.reshape(-1) for v in s.values()])
    assert cosine(s, t).item() == pytest.approx(1 - torch.nn.functional.cosine_similarity(flat_s, flat_t, 0).item(),
                                                abs=1e-5)
    assert l2(s, t).item() == pytest.approx((flat_s - flat_t).pow(2).sum().item(), rel=1e-5)
    # masks: sparse (gathered) and dense (multiplied) give the same as comparing the kept entries
    for keep in (0.1, 0.7):
        masks = {k: torch.rand(v.shape, generator=g) < keep for k, v in t.items()}
        kt = torch.cat([v[masks[k]] for k, v in t.items()])
        ks = torch.cat([v[masks[k]] for k, v in s.items()])
        if kt.numel() == 0 or kt.norm() == 0 or ks.norm() == 0:
            continue
        assert cosine_matching(t, masks=masks)(s).item() == pytest.approx(
            1 - torch.nn.functional.cosine_similarity(ks, kt, 0).item(), abs=1e-5)
        assert l2_matching(t, masks=masks)(s).item() == pytest.approx((ks - kt).pow(2).sum().item(), rel=1e-5)


# ------------------------------------------------------------------------------------------- presets
def test_presets_load_and_inherit():
    assert set(names()) == {"auto", "dlg", "idlg", "inverting_gradients", "rog"}
    dlg, idlg, ig, rog, auto = (preset(n) for n in ("dlg", "idlg", "ig", "rog", "auto"))
    assert auto["restarts"] == 1 and auto["fallback_batch"] == "rog" and 0 < auto["leak_share"] <= 1
    assert dlg["optimizer"] == "lbfgs" and dlg["labels"] == "joint" and dlg["objective"] == "l2"
    assert {**dlg, "labels": "infer"} == idlg  # idlg inherits dlg and changes only the labels
    assert ig["optimizer"] == "signed_adam" and ig["objective"] == "cosine" and ig["schedule"] == "step"
    assert rog["decoder"] == "bicubic" and rog["scale_factor"] == 4 and rog["schedule"] == "cosine"
    for p in (dlg, idlg, ig, rog, auto):  # default.yaml is inherited by all
        assert p["attacker_knows_obfuscation"] is True and p["unroll_local_steps"] is True
    assert resolve_settings("rog", {"scale_factor": 2, "objective": "cosine"})["scale_factor"] == 2
    with pytest.raises(UserError, match="optimizer must be one of"):
        resolve_settings("ig", {"optimizer": "sgd"})
    with pytest.raises(UserError, match="scale_factor"):
        resolve_settings("rog", {"scale_factor": 0})
    with pytest.raises(UserError, match="scale_factor"):
        resolve_settings("rog", {"scale_fator": 2})


# ----------------------------------------------------------------------------------------------- CLI
def test_cli_runs_each_attack_on_a_tiny_observation(tmp_path):
    import json

    from test_cli import assert_user_error, gradleak

    obs = tmp_path / "obs.pt"
    gradleak("capture", "--size", 16, "--batch-size", 2, "--arch", "lenet_zhu", "--out", obs)
    for name in ("dlg", "idlg", "ig", "rog"):
        out = tmp_path / name
        p = gradleak("attack", "--observation", obs, "--attack", name, "--out", out, "--truth",
                     tmp_path / "truth.npz", "--iterations", 3, "--restarts", 2, "--set", "tv_weight=0.001",
                     "--quiet")
        assert "PSNR" in p.stdout
        m = json.loads((out / "metrics.json").read_text())
        assert m["attack"] == ("inverting_gradients" if name == "ig" else name)
        assert m["threat_model"]["labels"] == ("joint" if name == "dlg" else "count")
        a = json.loads((out / "attack.json").read_text())
        assert a["settings"]["tv_weight"] == 0.001 and a["iterations"] == 3
        assert np.load(out / "reconstruction.npz")["images"].shape == (2, 1, 16, 16)
    assert_user_error(gradleak("attack", "--observation", obs, "--attack", "rog", "--set", "decoder=pixelshuffle",
                               "--out", tmp_path / "bad", check=False), "decoder must be one of")
    assert not (tmp_path / "bad").exists()


# -------------------------------------------------------------------------------- obfuscation-aware
AWARE_CASES = {
    "topk": ([{"name": "topk", "keep": 0.1}], "masked cosine + bound on unsent entries", 5.0),
    "sign": ([{"name": "sign"}], "sign agreement", 5.0),
    "qsgd": ([{"name": "qsgd", "levels": 4}], "qsgd likelihood", 5.0),
    "uniform": ([{"name": "uniform", "bits": 4}], "rounding-cell distance", 5.0),
    "gaussian": ([{"name": "gaussian", "clip": 1.0, "noise_multiplier": 0.003}], "snr-weighted cosine", 0.3),
}


@pytest.mark.parametrize("case", list(AWARE_CASES))
def test_each_obfuscation_aware_objective_beats_the_plain_one_on_a_fixed_case(case):
    spec, objective, margin = AWARE_CASES[case]
    b = load_dataset("phantoms", size=16).batch([3])
    obs, _ = capture(b.images, b.labels, arch="lenet_zhu", protocol=Protocol(), obfuscations=spec,
                     obfuscation_seed=0, labels_known=True)
    psnr = {}
    for knows in (False, True):
        rec = run_attack("inverting_gradients", obs, {"iterations": 100, "restarts": 1,
                                                      "attacker_knows_obfuscation": knows}, seed=0, progress=False)
        assert rec.threat_model["objective"].startswith(objective if knows else "cosine")
        psnr[knows] = score(b.images, b.labels, rec.images, rec.labels)["psnr"]
    assert psnr[True] > psnr[False] + margin, psnr


def test_aware_objectives_are_not_used_when_clients_are_averaged_or_the_attacker_is_not_told():
    from gradleak.attacks.aware import for_observation

    obs, _ = tiny_observation("lenet_zhu", n=2, obfuscations=[{"name": "sign"}])
    s = preset("ig")
    assert for_observation(obs, obs.update, "cosine", knows=True, settings=s).name == "sign agreement"
    assert for_observation(obs, obs.update, "cosine", knows=False, settings=s).name == "cosine"
    avg, _ = tiny_observation("lenet_zhu", n=2, obfuscations=[{"name": "qsgd", "levels": 4}],
                              protocol=Protocol(num_clients_averaged=2))
    m = for_observation(avg, avg.update, "cosine", knows=True, settings=s)
    assert m.name == "cosine" and "several clients" in m.info["aware"]


def test_the_mean_of_clients_signs_is_matched_as_their_votes():
    from gradleak.attacks.aware import for_observation, sign_matching

    # one client's signs: weights 1 and 0, the sign agreement as it was
    g = torch.Generator().manual_seed(0)
    true = torch.randn(200, generator=g)
    one = sign_matching({"w": torch.where(true < 0, -1.0, 1.0)})
    cand = {"w": torch.randn(200, generator=g)}
    z = cand["w"] / (0.5 * cand["w"].pow(2).mean().sqrt())
    expected = torch.where(true < 0, torch.nn.functional.softplus(z),
                           torch.relu(torch.nn.functional.softplus(-z) - math.log(2))).mean()
    assert one.fn(cand).item() == pytest.approx(expected.item(), rel=1e-6)
    # four clients' mean: an entry where all four sent -1 counts fully, a tie not at all
    votes = {"w": torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])}
    m = sign_matching(votes)
    positive = {"w": torch.full((5,), 3.0)}  # every entry positive: only the -1 shares cost
    per_entry = [sign_matching({"w": torch.tensor([x])}).fn({"w": torch.tensor([3.0])}).item() for x in (-1.0, 1.0)]
    assert m.fn(positive).item() == pytest.approx((1.0 + 0.75 + 0.5 + 0.25) * per_entry[0] / 5
                                                  + (0.25 + 0.5 + 0.75 + 1.0) * per_entry[1] / 5, rel=1e-6)
    obs, _ = tiny_observation("lenet_zhu", n=4, obfuscations=[{"name": "sign"}],
                              protocol=Protocol(num_clients_averaged=2))
    matching = for_observation(obs, obs.update, "l2", knows=True, settings=preset("rog"))
    assert matching.name == "sign agreement weighted by 2 clients' votes"


def test_qsgd_likelihood_is_the_mean_negative_log_probability_of_the_received_levels():
    from gradleak.attacks.aware import qsgd_matching

    g = torch.Generator().manual_seed(0)
    true = torch.randn(50, generator=g)
    norm = float(true.abs().max())
    received = torch.round(true / norm * 4) * norm / 4  # levels on the grid of s = 4
    m = qsgd_matching({"w": received}, {"name": "qsgd", "s": 4, "norm": "max"}, floor=0.05)
    cand = true + 0.01 * torch.randn(50, generator=g)
    d = (cand / norm * 4 - torch.round(received / norm * 4)).abs()
    assert bool((d < 0.95).all())
    assert torch.allclose(m({"w": cand}), (-torch.log1p(-d)).mean(), atol=1e-6)
    far = received + 2 * norm / 4  # two cells away: the linear continuation
    d_far = torch.full((50,), 2.0)
    expected = -math.log(0.05) + (d_far - 0.95) / 0.05
    assert torch.allclose(m({"w": far}), expected.mean(), rtol=1e-4)


def test_snr_weights_trust_the_layers_above_the_noise_and_all_layers_when_none_is():
    from gradleak.attacks.aware import snr_weights

    g = torch.Generator().manual_seed(0)
    target = {"loud": 10 * torch.randn(500, generator=g), "quiet": 0.01 * torch.randn(500, generator=g)}
    w = snr_weights(target, {"loud": 1.0, "quiet": 1.0})
    assert 0.95 < w["loud"] < 1 and w["quiet"] == 0
    # no layer above its noise: weighting them all out would leave nothing to match
    assert snr_weights(target, {"loud": 1e3, "quiet": 1e3}) == {"loud": 1.0, "quiet": 1.0}
