"""The obfuscation suite: each obfuscation's defining property, bits accounting, DP accounting, composition."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from gradleak import obfuscation as ob
from gradleak.errors import UserError
from gradleak.federated import ObservedProtocol
from gradleak.obfuscation import accounting
from gradleak.obfuscation._common import elias_omega, elias_omega_lengths, index_bits
from gradleak.obfuscation.noise import clip_update
from gradleak.obfuscation.quantize import qsgd_code_bits, qsgd_tensor, uniform_tensor

FAST = settings(max_examples=25, deadline=None)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def vec(seed: int, n: int, heavy: bool = True) -> torch.Tensor:
    g = gen(seed)
    v = torch.randn(n, generator=g)
    return v * torch.rand(n, generator=g) ** 3 if heavy else v


def toy_update(seed=0):
    g = gen(seed)
    return {"a.weight": torch.randn(6, 5, generator=g), "a.bias": torch.randn(6, generator=g) * 0.1,
            "b.weight": torch.randn(3, 6, generator=g) * 3}


def run(spec, update=None, seed=0, context=None):
    update = update if update is not None else toy_update()
    return ob.apply([spec], update, gen(seed), context)


# ------------------------------------------------------------------------------------------------ QSGD
@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(1, 12), levels=st.integers(2, 16),
       norm=st.sampled_from(["max", "l2"]))
def test_qsgd_is_unbiased_on_the_grid_and_within_its_variance_bound(seed, n, levels, norm):
    v = vec(seed, n)
    if float(v.abs().max()) == 0:
        v[0] = 1.0
    R = 2000  # independent draws: the vector repeated R times, one bucket each
    out, level, scale = qsgd_tensor(v.repeat(R), levels, norm, n, gen(seed))
    draws, s = out.view(R, n).double(), levels - 1
    x = v.double()
    sc = float(x.abs().max() if norm == "max" else x.norm())
    assert torch.allclose(scale, torch.full((R,), sc, dtype=torch.float64), rtol=1e-6)
    # on the grid {0, ±1/s, ..., ±1} * scale, with the input's sign
    steps = draws / (sc / s)
    assert torch.allclose(steps, steps.round(), atol=1e-3)
    assert int(level.max()) <= s and bool((draws * x >= 0).all())
    # unbiased: the mean of R draws is within 5 standard errors of v, plus a few single roundings for the
    # coordinates whose rounding probability is so small (about 1/R) that the normal approximation fails
    frac = (x.abs() / sc * s) - (x.abs() / sc * s).floor()
    coord_var = (sc / s) ** 2 * frac * (1 - frac)
    se = (coord_var / R).sqrt()
    assert bool(((draws.mean(0) - x).abs() <= 5 * se + 5 * (sc / s) / R + 1e-7).all())
    # variance: exact expectation sum_i (scale/s)^2 p_i (1 - p_i) lies within the paper's bound ...
    expected = float(coord_var.sum())
    if norm == "l2":  # Alistarh et al. 2017, Lemma 3.1: E||Q(v) - v||^2 <= min(n/s^2, sqrt(n)/s) ||v||^2
        bound = min(n / s ** 2, math.sqrt(n) / s) * float(x.norm()) ** 2
    else:  # each coordinate's variance is at most (scale/s)^2 / 4
        bound = n * (sc / s) ** 2 / 4
    assert expected <= bound * (1 + 1e-9) + 1e-12
    # ... and the empirical squared error matches it (within 6 standard errors of its exact distribution:
    # e_i^2 = (scale/s)^2 (1-p)^2 with probability p, else (scale/s)^2 p^2)
    err = ((draws - x) ** 2).sum(1)
    p = frac
    var_e = ((sc / s) ** 4 * (p * (1 - p) ** 4 + (1 - p) * p ** 4 - (p * (1 - p)) ** 2)).sum()
    assert abs(float(err.mean()) - expected) <= 6 * math.sqrt(float(var_e) / R) + 1e-9 * sc ** 2


def test_qsgd_through_the_registry_is_unbiased_per_tensor():
    u = toy_update(1)
    mean = {n: torch.zeros_like(v, dtype=torch.float64) for n, v in u.items()}
    R = 400
    g = gen(5)
    for _ in range(R):
        out, recs, _ = ob.apply([{"name": "qsgd", "levels": 4}], u, g)
        for n in u:
            mean[n] += out[n].double() / R
    for n, v in u.items():
        step = float(v.abs().max()) / 3
        assert torch.allclose(mean[n], v.double(), atol=5 * step / 2 / math.sqrt(R) + 1e-7), n
    assert recs[0]["s"] == 3 and recs[0]["norm"] == "max" and recs[0]["bucket_size"] is None
    assert set(recs[0]["scale"]) == set(u)


def test_qsgd_max_norm_keeps_the_largest_entry_exactly_and_buckets_have_their_own_scale():
    v = torch.tensor([0.1, -2.0, 0.3, 0.0, 5.0, -0.5])
    out, level, scale = qsgd_tensor(v, 16, "max", 3, gen())
    assert scale.tolist() == [2.0, 5.0]
    assert out[1] == -2.0 and out[4] == 5.0 and out[3] == 0.0


# --------------------------------------------------------------------------------------------- uniform
@FAST
@given(seed=st.integers(0, 10_000), n=st.integers(1, 200), bits=st.integers(2, 16))
def test_uniform_error_is_at_most_half_a_step(seed, n, bits):
    v = vec(seed, n) * 10
    out, q, step = uniform_tensor(v, 2 ** (bits - 1))
    assert step == pytest.approx(float(v.abs().max()) / (2 ** (bits - 1) - 1))
    assert float((out.double() - v.double()).abs().max()) <= step / 2 * (1 + 1e-6) + 1e-6 * float(v.abs().max())
    assert int(q.abs().max()) <= 2 ** (bits - 1) - 1
    out2, recs, _ = ob.apply([f"uniform:bits={bits}"], {"w": v})
    assert torch.equal(out2["w"], out) and recs[0]["bits"] == bits and recs[0]["scale"]["w"] == step


def test_fp16_and_bf16_round_to_their_formats():
    v = torch.tensor([1.0 + 2 ** -12, 70000.0, -3.14159, 1e-9])
    h = run("fp16", {"w": v})[0]["w"]
    assert h[0] == 1.0 and h[1] == 65504.0 and torch.equal(h, h.half().float())
    b = run("bf16", {"w": v})[0]["w"]
    assert torch.equal(b, v.to(torch.bfloat16).float())


def test_sign_is_binary_and_scaled_by_the_mean_magnitude():
    v = torch.tensor([0.5, -2.0, 0.0, 1.5])
    assert run("sign", {"w": v})[0]["w"].tolist() == [1.0, -1.0, 1.0, 1.0]
    out, recs, bits = run({"name": "signsgd", "scaled": True}, {"w": v})
    assert out["w"].tolist() == pytest.approx([1.0, -1.0, 1.0, 1.0])  # mean |v| = 1
    assert recs[0]["scale"]["w"] == pytest.approx(1.0) and recs[0]["scaled"] is True and bits == 4 + 32


# ----------------------------------------------------------------------------------------- sparsifiers
@FAST
@given(seed=st.integers(0, 10_000), keep=st.floats(0.001, 1.0), scope=st.sampled_from(["tensor", "global"]))
def test_topk_keeps_exactly_k_largest(seed, keep, scope):
    u = toy_update(seed)
    out, recs, _ = run({"name": "topk", "keep": keep, "scope": scope}, u)
    if scope == "tensor":
        for n, v in u.items():
            k = math.ceil(round(keep * v.numel(), 9))
            kept = out[n] != 0
            assert int(kept.sum()) == k == recs[0]["k"][n]
            assert torch.equal(out[n][kept], v[kept])
            if k < v.numel():
                assert float(v[kept].abs().min()) >= float(v[~kept].abs().max())
    else:
        a = torch.cat([v.reshape(-1) for v in u.values()])
        o = torch.cat([out[n].reshape(-1) for n in u])
        k = math.ceil(round(keep * a.numel(), 9))
        kept = o != 0
        assert int(kept.sum()) == k == recs[0]["k"]
        if k < a.numel():
            assert float(a[kept].abs().min()) >= float(a[~kept].abs().max())


def test_topk_k_and_rog_sparsity_alias():
    u = toy_update()
    out, recs, _ = run({"name": "topk", "k": 4}, u)
    assert all(int((out[n] != 0).sum()) == min(4, v.numel()) for n, v in u.items())
    assert recs[0]["keep"] == pytest.approx(12 / 54)
    a = run({"compress": "topk", "sparsity": 0.9}, u)
    b = run("topk:keep=0.1", u)
    assert a[1][0]["keep"] == pytest.approx(0.1) and "sparsity" not in a[1][0]
    assert all(torch.equal(a[0][n], b[0][n]) for n in u)


def test_randk_is_unbiased_and_keeps_exactly_k():
    v = vec(3, 50, heavy=False)
    R, acc = 4000, torch.zeros(50, dtype=torch.float64)
    g = gen(1)
    for _ in range(R):
        out, recs, _ = ob.apply(["randk:keep=0.2"], {"w": v}, g)
        assert int((out["w"] != 0).sum()) == 10
        acc += out["w"].double() / R
    # each entry is v*5 with prob 0.2, else 0: std of the mean is |v| * 2 / sqrt(R)
    assert bool(((acc - v.double()).abs() <= 5 * v.double().abs() * 2 / math.sqrt(R) + 1e-7).all())
    assert recs[0]["rescale"]["w"] == 5.0 and recs[0]["kept_fraction"] == 0.2


@FAST
@given(seed=st.integers(0, 10_000), p=st.floats(0, 100))
def test_prune_zeroes_exactly_the_entries_below_the_percentile(seed, p):
    u = toy_update(seed)
    out, recs, _ = run({"name": "prune", "p": p}, u)
    for n, v in u.items():
        t = np.percentile(v.abs().double().numpy(), p)
        below = v.abs().double().numpy() < t
        assert np.all(out[n].numpy()[below] == 0)
        assert np.array_equal(out[n].numpy()[~below], v.numpy()[~below])
        assert recs[0]["threshold"][n] == pytest.approx(t)


# -------------------------------------------------------------------------------------- clip and noise
@FAST
@given(seed=st.integers(0, 10_000), clip=st.floats(1e-3, 100), per_layer=st.booleans())
def test_clipping_bounds_the_norm(seed, clip, per_layer):
    u = {n: v * 10 ** (seed % 5 - 2) for n, v in toy_update(seed).items()}
    out, before, per_tensor = clip_update(u, clip, per_layer)
    total = math.sqrt(sum(float(v.double().norm()) ** 2 for v in out.values()))
    assert total <= clip * (1 + 1e-6)
    norm_in = math.sqrt(sum(float(v.double().norm()) ** 2 for v in u.values()))
    if per_layer:
        for n in u:
            assert float(out[n].double().norm()) <= clip / math.sqrt(len(u)) * (1 + 1e-6)
    elif norm_in <= clip:
        assert all(torch.equal(out[n], u[n]) for n in u)
    else:
        assert total == pytest.approx(clip, rel=1e-5)
        assert before == pytest.approx(norm_in)


def _big(seed=0):
    return {"w": torch.randn(50_000, generator=gen(seed)) * 1e-3, "b": torch.randn(1000, generator=gen(seed + 1))}


def test_gaussian_noise_has_the_recorded_std():
    u = _big()
    out, recs, _ = run({"name": "gaussian", "clip": 0.5, "noise_multiplier": 0.02}, u)
    r = recs[0]
    assert r["sigma"] == pytest.approx(0.01) and r["clip"] == 0.5 and r["sensitivity"] == 0.5
    clipped, _, _ = clip_update(u, 0.5)
    noise = torch.cat([(out[n] - clipped[n]).reshape(-1) for n in u])
    assert float(noise.std()) == pytest.approx(0.01, rel=0.02) and abs(float(noise.mean())) < 1e-4
    # per layer: a sigma per tensor
    out, recs, _ = run({"name": "gaussian", "clip": 0.5, "noise_multiplier": 0.02, "per_layer": True}, u)
    assert recs[0]["sigma"] == {"w": pytest.approx(0.01), "b": pytest.approx(0.01)}
    assert recs[0]["clip_per_tensor"]["w"] == pytest.approx(0.5 / math.sqrt(2))


def test_laplace_noise_std_is_scale_times_sqrt2():
    u = _big()
    out, recs, _ = run({"name": "laplace", "scale": 0.02}, u)
    noise = torch.cat([(out[n] - u[n]).reshape(-1) for n in u])
    assert recs[0]["sigma"] == pytest.approx(0.02 * math.sqrt(2))
    assert float(noise.std()) == pytest.approx(0.02 * math.sqrt(2), rel=0.02)
    # Laplace, not Gaussian: the mean absolute deviation is b
    assert float(noise.abs().mean()) == pytest.approx(0.02, rel=0.02)


def test_relative_gaussian_follows_nvflare_rule():
    u = _big()
    u["w"][:10_000] = 0  # zeros are ignored by the percentile
    out, recs, _ = run({"name": "relative_gaussian", "sigma0": 0.5}, u)
    a = np.concatenate([v.abs().double().numpy().reshape(-1) for v in u.values()])
    expected = 0.5 * np.percentile(a[a > 0], 95)
    assert recs[0]["sigma"] == pytest.approx(expected)
    noise = torch.cat([(out[n] - u[n]).reshape(-1) for n in u])
    assert float(noise.std()) == pytest.approx(expected, rel=0.02)


def test_snr_gaussian_sets_the_signal_to_noise_ratio():
    u = _big()
    out, recs, _ = run({"name": "snr_gaussian", "snr_db": 10}, u)
    for n, v in u.items():
        sigma = math.sqrt(float(v.double().var(unbiased=False)) / 10)
        assert recs[0]["sigma"][n] == pytest.approx(sigma)
    noise = out["w"] - u["w"]
    assert float(noise.std()) == pytest.approx(recs[0]["sigma"]["w"], rel=0.02)


# ------------------------------------------------------------------------------------------ DP accounting
@pytest.mark.parametrize("eps,q,steps", [(8.0, 1.0, 1), (1.0, 0.05, 200), (2.0, 0.5, 4)])
def test_derived_noise_multiplier_reproduces_opacus_epsilon(eps, q, steps):
    from opacus.accountants import RDPAccountant

    z = accounting.noise_multiplier_for(eps, 1e-5, q, steps)
    spent = accounting.epsilon_spent(z, q, steps, 1e-5)
    assert eps - accounting.EPSILON_TOLERANCE <= spent <= eps
    acc = RDPAccountant()
    for _ in range(steps):  # Opacus's own bookkeeping, step by step
        acc.step(noise_multiplier=z, sample_rate=q)
    assert acc.get_epsilon(delta=1e-5) == pytest.approx(spent, rel=1e-9)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Opacus's PRV at sample rate 1 takes log(0) internally
def test_prv_accountant_and_dp_mode_of_gaussian():
    from opacus.accountants import PRVAccountant

    z = accounting.noise_multiplier_for(4.0, 1e-5, 1.0, 2, accountant="prv")
    acc = PRVAccountant()
    for _ in range(2):
        acc.step(noise_multiplier=z, sample_rate=1.0)
    assert 4.0 - 0.01 <= acc.get_epsilon(delta=1e-5) <= 4.0 + 1e-6
    out, recs, _ = run({"name": "gaussian", "clip": 2.0, "target_epsilon": 4.0, "rounds": 2, "accountant": "prv"})
    r = recs[0]
    assert r["noise_multiplier"] == z and r["sigma"] == pytest.approx(2 * z)
    assert 3.99 <= r["epsilon"] <= 4.0 and r["dp_unit"] == "client"


def test_dp_schedule_comes_from_the_context_unless_the_spec_gives_it():
    ctx = ob.Context(sample_rate=0.05, rounds=200)
    _, recs, _ = run({"name": "gaussian", "clip": 1.0, "target_epsilon": 1.0}, context=ctx)
    assert recs[0]["sample_rate"] == 0.05 and recs[0]["rounds"] == 200
    assert recs[0]["noise_multiplier"] == accounting.noise_multiplier_for(1.0, 1e-5, 0.05, 200)
    _, recs, _ = run({"name": "gaussian", "clip": 1.0, "target_epsilon": 1.0, "rounds": 1}, context=ctx)
    assert recs[0]["rounds"] == 1


def test_accounting_rejects_bad_schedules():
    for args in [(8, 1e-5, 0, 1), (8, 1e-5, 1.5, 1), (8, 0, 0.1, 1), (8, 1e-5, 0.1, 0), (-1, 1e-5, 0.1, 1)]:
        with pytest.raises(UserError):
            accounting.noise_multiplier_for(*args)
    with pytest.raises(UserError):
        accounting.epsilon_spent(1.0, 0.1, 10, 1e-5, accountant="moments")
    assert accounting.epsilon_spent(0.0, 0.1, 10, 1e-5) == math.inf


# --------------------------------------------------------------------------- composition and determinism
def test_composition_is_applied_in_order_and_order_matters():
    u = toy_update()
    a = [{"name": "topk", "keep": 0.2}, {"name": "gaussian", "sigma": 0.1}]
    out_ab, recs, _ = ob.apply(a, u, gen(7))
    assert [r["name"] for r in recs] == ["topk", "gaussian"]
    # the same as applying the steps one after the other with the same generator
    g = gen(7)
    step1, _, _ = ob.apply(a[:1], u, g)
    step2, _, _ = ob.apply(a[1:], step1, g)
    assert all(torch.equal(out_ab[n], step2[n]) for n in u)
    out_ba, recs_ba, _ = ob.apply(a[::-1], u, gen(7))
    assert [r["name"] for r in recs_ba] == ["gaussian", "topk"]
    assert all(int((out_ba[n] != 0).sum()) < v.numel() for n, v in u.items())  # sparse at the end
    assert all(int((out_ab[n] != 0).sum()) == v.numel() for n, v in u.items())  # noise fills the zeros


@pytest.mark.parametrize("spec", ["qsgd", "randk:keep=0.3", "gaussian:sigma=0.1", "laplace:scale=0.1",
                                  "relative_gaussian", "snr_gaussian:snr_db=5", "topk:keep=0.3"])
def test_same_seed_same_output(spec):
    u = toy_update()
    a, ra, _ = run(spec, u, seed=3)
    b, rb, _ = run(spec, u, seed=3)
    assert all(torch.equal(a[n], b[n]) for n in u) and ra == rb
    if spec != "topk:keep=0.3":  # random ones differ under another seed
        c, _, _ = run(spec, u, seed=4)
        assert any(not torch.equal(a[n], c[n]) for n in u)


def test_the_update_is_not_modified():
    u = toy_update()
    before = {n: v.clone() for n, v in u.items()}
    for spec in ["qsgd", "uniform", "sign", "topk", "prune", "gaussian:clip=0.1,noise_multiplier=1", "fp16"]:
        run(spec, u)
    assert all(torch.equal(u[n], before[n]) for n in u)


# ---------------------------------------------------------------------------------------------- bits
def test_elias_omega_codes_and_lengths():
    assert [elias_omega(i) for i in (1, 2, 3, 4, 16)] == ["0", "100", "110", "101000", "10100100000"]
    n = torch.arange(1, 3000)
    assert elias_omega_lengths(n).tolist() == [len(elias_omega(int(i))) for i in n]


def test_bits_on_known_cases():
    u = {"w": torch.arange(1, 101, dtype=torch.float32).view(10, 10), "b": torch.tensor([1.0, -2.0, 3.0])}
    n = 103
    assert run("none", u)[2] == 32 * n
    assert run("fp16", u)[2] == 16 * n
    assert run("sign", u)[2] == n and run("sign:scaled=true", u)[2] == n + 2 * 32
    assert run("uniform:bits=8", u)[2] == (32 + 8 * 100) + (32 + 8 * 3)
    # top-k: values + fixed-width indices (ceil(log2 100) = 7, ceil(log2 3) = 2)
    assert run("topk:keep=0.1", u)[2] == 10 * (32 + 7) + 1 * (32 + 2)
    assert index_bits(1) == 0 and index_bits(2) == 1 and index_bits(100) == 7
    # a dense top-k is never dearer than the dense update
    assert run("topk:keep=1", u)[2] == 32 * n
    # noise: every entry again
    assert run("gaussian:sigma=0.1", u)[2] == 32 * n
    # QSGD: the paper's code, by hand. [0, 1, 0, 0, -1] with s = 1: both non-zeros at level 1 exactly.
    v = {"x": torch.tensor([0.0, 1.0, 0.0, 0.0, -1.0])}
    out, recs, bits = run("qsgd:levels=2", v)
    # 32 (scale) + [omega(2)=3 + sign 1 + omega(1)=1] + [gap 3: omega(3)=3 + 1 + 1]
    assert out["x"].tolist() == [0.0, 1.0, 0.0, 0.0, -1.0] and bits == 32 + 5 + 5
    assert recs[0]["update_bits"] == bits
    _, level, _ = qsgd_tensor(torch.tensor([0.0, 1.0, 0.0, 0.0, -1.0, 0.0, 4.0]), 5, "max", None, gen())
    # levels [0, 1, 0, 0, 1, 0, 4]: positions 2, 5, 7 -> gaps 2, 3, 2; levels 1, 1, 4
    assert qsgd_code_bits(level) == 32 + (3 + 3 + 3) + 3 + (1 + 1 + 6)


def test_bits_of_composition_are_those_of_the_last_encoding():
    u = toy_update()
    _, recs, bits = ob.apply(["topk:keep=0.1", "qsgd"], u)
    assert recs[0]["update_bits"] > bits == recs[1]["update_bits"]
    _, recs, bits = ob.apply(["qsgd", "none"], u)
    assert recs[1]["update_bits"] == recs[0]["update_bits"] == bits


# --------------------------------------------------------------------------------- specs and records
def test_parse_spec_and_aliases():
    assert ob.parse_spec("qsgd:levels=16,norm=l2,bucket_size=none") == {
        "name": "qsgd", "levels": 16, "norm": "l2", "bucket_size": None}
    assert ob.parse_spec("gaussian:clip=1e-2,per_layer=true") == {"name": "gaussian", "clip": 0.01, "per_layer": True}
    assert ob.parse_spec(" sign ") == {"name": "sign"}
    rog = ob.resolve({"compress": "qsgd", "quant_level": 16})
    assert rog[0].name == "qsgd" and rog[1] == {"levels": 16, "norm": "max", "bucket_size": None}
    assert ob.resolve({"name": "clip_gaussian", "clip": 1, "noise_multiplier": 0.1})[0].name == "gaussian"
    assert ob.resolve("uniform:levels=16")[1] == {"bits": 5, "levels": 16}
    assert ob.resolve("uniform")[1] == {"bits": 8, "levels": 128}


@pytest.mark.parametrize("spec,fragment", [
    ("qsgd:levels=1", "levels must be an integer >= 2"),
    ("qsgd:levels=2.5", "levels must be an integer"),
    ("qsgd:norm=l1", "norm must be one of max, l2"),
    ("topk:keep=0", "keep must be a number in (0, 1]"),
    ("topk:keep=1.5", "keep must be a number in (0, 1]"),
    ("topk:keep=0.1,k=3", "give one of keep, k or sparsity"),
    ("randk:keep=-0.1", "keep must be"),
    ("prune:p=101", "p must be a number in [0, 100]"),
    ("gaussian:clip=1,noise_multiplier=-1", "noise_multiplier must be a number >= 0"),
    ("gaussian:sigma=-0.1", "sigma must be"),
    ("gaussian:clip=1", "exactly one of noise_multiplier, sigma or target_epsilon"),
    ("gaussian:clip=-1,noise_multiplier=1", "clip must be"),
    ("gaussian:clip=1,target_epsilon=1,delta=2", "delta must be"),
    ("laplace:scale=-1", "scale must be"),
    ("laplace", "needs scale"),
    ("relative_gaussian:sigma0=-1", "sigma0 must be"),
    ("snr_gaussian", "needs snr_db"),
    ("uniform:bits=1", "bits must be an integer in [2, 32]"),
    ("sign:scaled=3", "scaled must be true or false"),
    ("qsdg", "unknown obfuscation 'qsdg' (did you mean 'qsgd'?)"),
    ("qsgd:level=4", "has no parameter 'level' (did you mean 'levels'?)"),
    ("topk:keep", "expected key=value"),
])
def test_bad_parameters_are_one_line_user_errors(spec, fragment):
    with pytest.raises(UserError) as e:
        ob.resolve(spec)
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_noise_multiplier_without_sensitivity_is_a_user_error():
    with pytest.raises(UserError, match="needs a clip norm"):
        run("gaussian:noise_multiplier=1")


def test_records_are_plain_and_survive_weights_only_loading(tmp_path):
    specs = ["qsgd", "uniform:bits=4", "sign:scaled=true", "topk:keep=0.2", "randk:keep=0.5", "prune",
             "gaussian:clip=1,target_epsilon=8", "gaussian:clip=1,noise_multiplier=0.1,per_layer=true",
             "laplace:clip=1,scale=0.1", "relative_gaussian", "snr_gaussian:snr_db=3", "fp16", "bf16", "none"]
    _, recs, _ = ob.apply(specs, toy_update())
    json.dumps(recs, allow_nan=False)
    torch.save(recs, tmp_path / "r.pt")
    assert torch.load(tmp_path / "r.pt", weights_only=True) == recs
    by_name = {}
    for r in recs:
        by_name.setdefault(r["name"], r)
    # what a knowing server needs
    assert {"levels", "norm", "bucket_size"} <= set(by_name["qsgd"])
    assert {"bits", "scale"} <= set(by_name["uniform"]) and by_name["sign"]["scaled"] is True
    assert by_name["topk"]["keep"] == 0.2 and by_name["randk"]["keep"] == 0.5 and "keep" in by_name["prune"]
    assert {"sigma", "clip", "noise_multiplier", "epsilon"} <= set(by_name["gaussian"])
    assert all(isinstance(r["update_bits"], int) for r in recs)


def test_merge_client_records_reports_the_noise_of_the_mean():
    a = [{"name": "gaussian", "sigma": 0.3, "update_bits": 100}, {"name": "qsgd", "levels": 4, "update_bits": 10}]
    b = [{"name": "gaussian", "sigma": 0.4, "update_bits": 100}, {"name": "qsgd", "levels": 4, "update_bits": 12}]
    m = ob.merge_client_records([a, b])
    assert m[0]["sigma"] == pytest.approx(math.sqrt((0.09 + 0.16) / 2))
    assert m[0]["sigma_of_mean"] == pytest.approx(0.5 / 2)
    assert m[0]["per_client"] == [{"sigma": 0.3}, {"sigma": 0.4}] and m[0]["update_bits"] == 100
    assert m[1] == {"name": "qsgd", "levels": 4, "update_bits": 11,
                    "per_client": [{"update_bits": 10}, {"update_bits": 12}]}


@pytest.mark.parametrize("spec", [{"name": "topk", "keep": 0.1}, "qsgd:levels=4", {"compress": "uniform", "bits": 4},
                                  {"name": "gaussian", "clip": 1.0, "noise_multiplier": 0.3}, "prune:p=0.5",
                                  [{"name": "topk", "keep": 0.2}, {"name": "qsgd", "levels": 8}]])
def test_each_record_names_the_spec_that_reproduces_it(spec):
    """Records mix parameters with what the step measured (topk's k per tensor, noise's sigma): the
    ``spec`` entry alone must reproduce the step, bit for bit with the same generator."""
    specs = spec if isinstance(spec, list) else [spec]
    update = {"a": torch.randn(40, 7, generator=torch.Generator().manual_seed(3)), "b": torch.randn(9)}
    out, records, bits = ob.apply(specs, update, torch.Generator().manual_seed(5))
    again = [ob.spec_of_record(r) for r in records]
    out2, records2, bits2 = ob.apply(again, update, torch.Generator().manual_seed(5))
    assert bits2 == bits and all(torch.equal(out[k], out2[k]) for k in out)
    assert [r["spec"] for r in records2] == [r["spec"] for r in records]
    with pytest.raises(UserError, match="does not name its spec"):
        ob.spec_of_record({k: v for k, v in records[0].items() if k != "spec"})


# ------------------------------------------------------------------------------- what each one reveals
def test_every_obfuscation_declares_what_it_reveals():
    from gradleak.obfuscation.registry import FAMILIES

    families = {n: ob.get(n).family for n in ob.names()}
    assert set(families.values()) <= set(FAMILIES)
    assert families["qsgd"] == families["uniform"] == "quantize" and families["fp16"] == "cast"
    assert {n for n, f in families.items() if f == "sparsify"} == {"topk", "randk", "prune"}
    assert {n for n, f in families.items() if f == "noise"} == {"gaussian", "laplace", "relative_gaussian",
                                                               "snr_gaussian"}
    assert ob.get("qsgd").stochastic and not ob.get("uniform").stochastic and ob.get("randk").stochastic
    assert all(ob.get(n).keeps_zeros for n in ("none", "qsgd", "uniform", "fp16", "bf16", "topk"))
    assert not ob.get("sign").keeps_zeros and not ob.get("gaussian").keeps_zeros
    assert ob.get("topk").bounds_unsent and ob.get("prune").bounds_unsent and not ob.get("randk").bounds_unsent
    # the scale: lost by signSGD, and by clipping (an unknown factor), kept otherwise
    assert not ob.get("sign").recovers_scale({"scaled": True})
    assert not ob.get("gaussian").recovers_scale(ob.resolve("gaussian:clip=1,noise_multiplier=0.1")[1])
    assert ob.get("gaussian").recovers_scale(ob.resolve("gaussian:sigma=0.1")[1])
    assert ob.get("qsgd").recovers_scale(ob.resolve("qsgd")[1])
    # aliases and ROG's keys are declared by each obfuscation
    assert ob.get("SignSGD").name == "sign" and ob.NAME_ALIASES["nvflare"] == "relative_gaussian"
    assert ob.get("qsgd").keys["quant_level"] == "levels" and ob.get("uniform").keys["quant_level"] == "levels"


def test_register_refuses_inconsistent_declarations():
    from gradleak.obfuscation.params import NoParams
    from gradleak.obfuscation.registry import register

    fn = ob.get("none").fn
    with pytest.raises(ValueError, match="family must be one of"):
        register(ob.Obfuscation("blur", fn, family="blur"))
    with pytest.raises(ValueError, match="must declare sigma"):  # a noise needs its std on the server side
        register(ob.Obfuscation("hum", fn, family="noise", stochastic=True))
    with pytest.raises(ValueError, match="already taken by 'sign'"):
        register(ob.Obfuscation("signsgd", fn, family="sign"))
    with pytest.raises(ValueError, match="names no parameter"):
        register(ob.Obfuscation("cast8", fn, NoParams, family="cast", keys={"width": "bits"}))
    assert "blur" not in ob.names() and "hum" not in ob.names() and "cast8" not in ob.names()


def test_parameter_models_keep_strict_types():
    # a boolean is not a number, a numeric string is not a number, an integral float is an integer
    for spec, fragment in [({"name": "qsgd", "levels": True}, "levels must be an integer >= 2, got True"),
                           ({"name": "topk", "keep": "0.1"}, "keep must be a number in (0, 1], got '0.1'"),
                           ({"name": "gaussian", "sigma": float("nan")}, "sigma must be a number >= 0"),
                           ({"name": "sign", "scaled": 1}, "scaled must be true or false, got 1"),
                           ({"name": "qsgd", "norm": None}, "norm must be one of max, l2, got None")]:
        with pytest.raises(UserError) as e:
            ob.resolve(spec)
        assert fragment in str(e.value), str(e.value)
    assert ob.resolve({"name": "qsgd", "levels": 16.0, "norm": "L2"})[1] == {"levels": 16, "norm": "l2",
                                                                            "bucket_size": None}
    assert ob.resolve({"name": "topk", "sparsity": 0.99})[1] == {"keep": 0.01, "k": None, "scope": "tensor"}
    with pytest.raises(UserError, match="unknown obfuscation 'None'"):  # a missing name is not 'none'
        ob.resolve({"name": None})


def _received(update, exact=True, **protocol):
    header = {"num_images": 4, "algorithm": "fedsgd", **protocol}
    return ob.Received(update, ob.Context.from_protocol(ObservedProtocol.from_header(header)),
                       exact)


@pytest.mark.parametrize("spec,minimal", [
    ("qsgd:levels=4", {"name": "qsgd", "levels": 4}),
    ("qsgd:levels=8,norm=l2,bucket_size=5", {"name": "qsgd", "quant_level": 8, "norm": "l2", "bucket": 5}),
    ("uniform:bits=4", {"name": "uniform", "bits": 4}),
    ("randk:keep=0.3", {"name": "random_k", "keep": 0.3}),
    ("topk:keep=0.2,scope=global", {"name": "topk", "keep": 0.2, "scope": "global"}),
    ("gaussian:clip=0.5,noise_multiplier=0.2", {"name": "gaussian", "clip": 0.5, "noise_multiplier": 0.2}),
    ("gaussian:clip=0.5,noise_multiplier=0.2,per_layer=true",
     {"name": "gaussian", "clip": 0.5, "noise_multiplier": 0.2, "per_layer": True}),
    ("gaussian:sigma=0.01", {"name": "dp", "std": 0.01}),
    ("gaussian:clip=1,target_epsilon=8", {"name": "gaussian", "clip": 1, "epsilon": 8}),
    ("laplace:scale=0.02", {"name": "laplace", "b": 0.02}),
])
def test_server_record_derives_what_a_minimal_record_leaves_out(spec, minimal):
    """A record with the name and the parameters only reads, on the server side, as gradleak's own."""
    update = toy_update()
    out, recs, _ = ob.apply([spec], update, gen(3))
    own = ob.server_record(recs[0], _received(out))
    derived = ob.server_record(minimal, _received(out))
    server_keys = set(ob.get(recs[0]["name"]).server.model_fields)
    assert all(derived[k] is not None for k, f in ob.get(recs[0]["name"]).server.model_fields.items()
               if f.is_required())
    for key in server_keys:
        a, b = own[key], derived[key]
        if b is None:  # left to the update (QSGD's norms are read off its buckets)
            continue
        if isinstance(a, dict) or isinstance(b, dict):
            a = a if isinstance(a, dict) else {n: a for n in out}
            b = b if isinstance(b, dict) else {n: b for n in out}
            assert set(a) == set(b) and all(b[n] == pytest.approx(a[n], rel=1e-9) for n in a), key
        else:
            assert b == pytest.approx(a, rel=1e-9) if isinstance(a, float) else b == a, key


def test_server_record_estimates_snr_noise_and_says_what_it_cannot_derive():
    g = gen(0)
    update = {"w": torch.randn(200, 50, generator=g), "b": torch.randn(5000, generator=g) * 0.1}
    out, recs, _ = ob.apply(["snr_gaussian:snr_db=0"], update, gen(1))
    est = ob.server_record({"name": "snr_gaussian", "snr_db": 0}, _received(out))["sigma"]
    assert all(est[n] == pytest.approx(recs[0]["sigma"][n], rel=0.05) for n in update)
    with pytest.raises(ob.Underivable, match="later steps changed"):
        ob.server_record({"name": "snr_gaussian", "snr_db": 0}, _received(out, exact=False))
    with pytest.raises(ob.Underivable, match="percentile of the update before the noise"):
        ob.server_record({"name": "relative_gaussian"}, _received(out))
    with pytest.raises(ob.Underivable, match="needs a clip norm"):
        ob.server_record({"name": "gaussian", "noise_multiplier": 1.0}, _received(out))
    # the protocol's per-example clipping gives the sensitivity: clip / B under FedSGD, none under FedAvg
    assert ob.server_record({"name": "gaussian", "noise_multiplier": 2.0},
                            _received(out, per_example_clip=1.0))["sigma"] == pytest.approx(0.5)
    with pytest.raises(ob.Underivable, match="under fedavg"):
        ob.server_record({"name": "gaussian", "noise_multiplier": 2.0},
                         _received(out, per_example_clip=1.0, algorithm="fedavg", local_lr=0.1))
    with pytest.raises(ob.Underivable, match="parameters are invalid .*levels must be an integer >= 2"):
        ob.server_record({"name": "qsgd", "levels": 1}, _received(out))
    with pytest.raises(ob.Underivable, match="s must be an integer >= 1, got 'x'"):
        ob.server_record({"name": "qsgd", "s": "x"}, _received(out))
    with pytest.raises(ob.Underivable, match="sigma names no value for tensor 'b'"):
        ob.server_record({"name": "laplace", "sigma": {"w": 0.1}}, _received(out))
    with pytest.raises(UserError, match="did you mean 'qsgd'"):
        ob.server_record({"name": "qsdg"}, _received(out))
