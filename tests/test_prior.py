"""The learned post-processing prior: file format, training, patient disjointness, use by the attack."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from gradleak.attacks import run_attack
from gradleak.data import load_dataset
from gradleak.errors import UserError
from gradleak.prior import (FORMAT, Prior, PriorNet, calibrate, check_disjoint, degrade, load_prior_file,
                            save_prior, select_images, train_prior)
from gradleak.prior.degrade import DEFAULT_DEGRADATION, LEAK_DEGRADATION, decode, latent_of, project
from gradleak.prior.fileformat import HEADER_KEY

sys.path.insert(0, str(Path(__file__).parent))
from factories import tiny_observation  # noqa: E402
from test_cli import assert_user_error, gradleak  # noqa: E402

TINY = dict(size=16, steps=150, batch_size=8, crop=None, width=4, lr=5e-3, checkpoint_every=1000, progress=False)


def tiny_data(n: int = 24):
    return load_dataset("phantoms", n=n, size=16)


@pytest.fixture(scope="module")
def tiny_prior(tmp_path_factory):
    path = tmp_path_factory.mktemp("prior") / "tiny.safetensors"
    header = train_prior(tiny_data(), path, exclude_patients=["phantom0", "phantom1"], **TINY)
    return path, header


# ------------------------------------------------------------------------------------------- file format
def test_round_trip_keeps_weights_and_header(tiny_prior, tmp_path):
    path, header = tiny_prior
    net, loaded = load_prior_file(path)
    assert loaded["format"] == FORMAT and loaded["arch"] == "unet3" and loaded["size"] == 16
    assert loaded["network"] == {"width": 4, "num_classes": 0, "channels": 1}
    assert loaded["training"]["patients"] == header["training"]["patients"]
    assert loaded["degradation"] == DEFAULT_DEGRADATION
    again = save_prior(tmp_path / "again.safetensors", net, {k: loaded[k] for k in ("size", "training",
                                                                                    "degradation")})
    net2, loaded2 = load_prior_file(again)
    for (k, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items()):
        assert torch.equal(a, b), k
    assert loaded2 == loaded
    x = torch.rand(2, 1, 16, 16)
    assert torch.equal(Prior(net, loaded)(x), Prior(net2, loaded2)(x))


def _rewrite(src: Path, dst: Path, edit=None, meta_text: str | None = None, drop: str | None = None):
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    header = json.loads(meta[HEADER_KEY])
    if edit:
        edit(header)
    if drop:
        tensors.pop(drop)
    save_file(tensors, str(dst), metadata={HEADER_KEY: meta_text if meta_text is not None else json.dumps(header)})
    return dst


@pytest.mark.parametrize("edit, meta_text, drop, fragment", [
    (lambda h: h.update(format="gradleak-prior/99"), None, None, "unknown prior format"),
    (lambda h: h.update(arch="resnet_hub"), None, None, "unknown prior architecture"),
    (lambda h: h.update(pickle="cos\nsystem"), None, None, "unknown prior header key"),
    (lambda h: h.pop("degradation"), None, None, "lacks degradation"),
    (lambda h: h["degradation"].update(blur=3), None, None, "unknown degradation setting"),
    (lambda h: h["network"].update(width=8), None, None, "has shape"),
    (None, "{not json", None, "not valid JSON"),
    (None, None, "out.bias", "do not fit"),
])
def test_tampered_or_unknown_header_is_refused(tiny_prior, tmp_path, edit, meta_text, drop, fragment):
    bad = _rewrite(tiny_prior[0], tmp_path / "bad.safetensors", edit, meta_text, drop)
    with pytest.raises(UserError, match=fragment):
        load_prior_file(bad)


def test_files_that_are_not_priors_are_refused(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_prior_file(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x80\x04\x95 a pickle, not safetensors")
    with pytest.raises(UserError, match="not a prior file"):
        load_prior_file(junk)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(plain))
    with pytest.raises(UserError, match="not a gradleak prior"):
        load_prior_file(plain)


# ---------------------------------------------------------------------------------------------- training
def test_training_loss_falls_on_a_tiny_set(tiny_prior):
    t = tiny_prior[1]["training"]
    assert t["eval_loss"] < 0.9 * t["eval_loss_identity"], t
    assert t["loss_curve"][-1] < t["loss_curve"][0]


def test_training_is_deterministic_and_resumes_to_the_same_weights(tmp_path):
    kw = {**TINY, "steps": 6, "checkpoint_every": 2}
    a = tmp_path / "a.safetensors"
    train_prior(tiny_data(), a, **kw)
    b = tmp_path / "b.safetensors"
    assert train_prior(tiny_data(), b, stop_after=3, **kw) is None  # "interrupted" after 3 steps
    assert not b.exists() and (tmp_path / "b.safetensors.ckpt").is_file()
    header = train_prior(tiny_data(), b, **kw)
    assert header is not None and not (tmp_path / "b.safetensors.ckpt").exists()
    (na, _), (nb, _) = load_prior_file(a), load_prior_file(b)
    for (k, x), (_, y) in zip(na.state_dict().items(), nb.state_dict().items()):
        assert torch.equal(x, y), k
    # a checkpoint of other settings is not silently reused
    assert train_prior(tiny_data(), b, stop_after=2, **kw) is None
    with pytest.raises(UserError, match="other data or settings"):
        train_prior(tiny_data(), b, **{**kw, "lr": 1e-3})


def test_label_conditioned_prior_uses_the_labels(tmp_path):
    path = tmp_path / "cond.safetensors"
    train_prior(tiny_data(), path, num_classes=2, **{**TINY, "steps": 10})
    prior = Prior.load(path)
    x = torch.rand(2, 1, 16, 16)
    assert prior.header["network"]["num_classes"] == 2
    assert not torch.equal(prior(x, torch.tensor([0, 0])), prior(x, torch.tensor([1, 1])))


# ------------------------------------------------------------------------------------ patient disjointness
def test_exclusion_list_keeps_patients_out_and_disjointness_check_raises_on_overlap(tiny_prior):
    ds = tiny_data()
    excluded = ["phantom0", "phantom1"]
    idx = select_images(ds.patient_ids, excluded)
    assert idx and not {ds.patient_ids[i] for i in idx} & set(excluded)
    assert len(idx) == sum(p not in excluded for p in ds.patient_ids)
    prior = Prior.load(tiny_prior[0])
    assert set(prior.patients) == {p for p in ds.patient_ids if p not in excluded}
    assert prior.header["training"]["excluded_patients"] == excluded
    prior.check_disjoint(["phantom0", "phantom1", "someone else"])  # disjoint: fine
    with pytest.raises(UserError, match="attacked patient.*phantom2"):
        prior.check_disjoint(["phantom0", "phantom2"])
    with pytest.raises(UserError, match="p7"):
        check_disjoint(["p1", "p7"], ["p7"])


def test_limit_takes_whole_patients():
    ds = tiny_data(40)
    idx = select_images(ds.patient_ids, limit=10, seed=3)
    chosen = {ds.patient_ids[i] for i in idx}
    assert 0 < len(idx) <= 10
    assert len(idx) == sum(p in chosen for p in ds.patient_ids)


# ------------------------------------------------------------------------------------- the attack uses it
@pytest.mark.parametrize("size", [16, 20, 32])
def test_attack_applies_the_prior_at_any_size(tiny_prior, size):
    prior = Prior.load(tiny_prior[0])
    obs, _ = tiny_observation(n=2, size=size)
    rec = run_attack("rog", obs, {"iterations": 3, "restarts": 1}, progress=False, postprocess=prior)
    raw = rec.extras["without_postprocessing"]
    assert rec.images.shape == raw.shape == (2, 1, size, size)
    assert not torch.equal(rec.images, raw)
    assert torch.allclose(rec.images, prior(raw, rec.labels))
    assert rec.threat_model["postprocessing"].startswith("learned prior tiny.safetensors")


def test_prior_refuses_images_it_cannot_process(tiny_prior):
    prior = Prior.load(tiny_prior[0])
    with pytest.raises(UserError, match="1-channel"):
        prior(torch.rand(1, 3, 16, 16))
    with pytest.raises(UserError, match="at least 4x4"):
        prior(torch.rand(1, 1, 3, 3))


# ----------------------------------------------------------------------------------- degradation model
@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), side=st.integers(4, 24), scale=st.sampled_from([1, 2, 4]),
       noise=st.floats(0, 0.3))
def test_degradation_stays_in_range_and_is_deterministic(seed, side, scale, noise):
    x = torch.rand(2, 1, side, side, generator=torch.Generator().manual_seed(seed))
    s = {"scale_factor": scale, "latent_noise": noise, "pixel_noise": noise}
    a = degrade(x, s, torch.Generator().manual_seed(seed))
    b = degrade(x, s, torch.Generator().manual_seed(seed))
    assert a.shape == x.shape and torch.equal(a, b)
    assert float(a.min()) >= 0 and float(a.max()) <= 1


def test_degradation_without_noise_is_rogs_decoding_and_calibration_recovers_the_noise():
    x = load_dataset("phantoms", n=8, size=32).load(range(8))
    zero = {"latent_noise": 0, "contrast": 0, "brightness": 0, "pixel_noise": 0}
    perfect = project(x, 4).clamp(0, 1)
    assert torch.allclose(degrade(x, zero, torch.Generator().manual_seed(0)), perfect, atol=1e-5)
    assert all(v < 1e-3 for k, v in calibrate(x, perfect).items() if k != "scale_factor")
    g = torch.Generator().manual_seed(1)
    latent = latent_of(x, 4)
    noisy = decode(latent + 0.05 * torch.randn(latent.shape, generator=g), (32, 32))
    est = calibrate(x, noisy, quantile=0.5)
    assert 0.03 < est["latent_noise"] < 0.07, est
    assert est["contrast"] < 0.1 and est["brightness"] < 0.02


def test_calibration_plays_client_on_auxiliary_patients_and_tells_the_regimes_apart():
    """calibrate_like captures auxiliary images exactly as the observation was made (here: without
    obfuscation, and under heavy Gaussian noise), runs ROG on them and fits the degradation model: only
    non-excluded patients, deterministic by seed, and the noisy regime comes out more degraded."""
    from gradleak.capture import capture
    from gradleak.experiment.calibrate import calibrate_like
    from gradleak.federated import Protocol
    from gradleak.federated.protocol import ObservedProtocol
    from gradleak.prior.degrade import check_degradation

    ds = load_dataset("phantoms", n=24, size=16)
    b = ds.batch([0])
    fits = {}
    for name, specs in (("none", []), ("noise", [{"name": "gaussian", "clip": 1.0, "noise_multiplier": 0.5}])):
        obs, _ = capture(b.images, b.labels, arch="lenet_zhu", protocol=Protocol(), obfuscations=specs)
        fit = calibrate_like(obs, ds, exclude_patients=b.patient_ids, images=3,
                             attack_settings={"iterations": 30})
        assert fit == calibrate_like(obs, ds, exclude_patients=b.patient_ids, images=3,
                                     attack_settings={"iterations": 30})
        cal = fit["calibration"]
        assert cal["images"] == 3 and len(cal["patients"]) == 3 and "phantom0" not in cal["patients"]
        assert cal["obfuscation"] == [{**s, "name": "gaussian"} for s in specs]
        assert check_degradation(fit["degradation"]) == fit["degradation"]
        fits[name] = fit["degradation"]
    assert fits["noise"]["contrast"] > fits["none"]["contrast"] + 0.2
    assert fits["noise"]["latent_noise"] > fits["none"]["latent_noise"]
    with pytest.raises(UserError, match="auxiliary patients left"):
        calibrate_like(obs, ds, exclude_patients=sorted(set(ds.patient_ids)), images=1)
    # the auxiliary captures are the client's own: where its training diverges, the error says it was calibration's
    b2 = ds.batch([0, 1])
    fedavg, _ = capture(b2.images, b2.labels, arch="lenet5", protocol=Protocol("fedavg", 2, 0.1))
    diverging = dataclasses.replace(fedavg, protocol=ObservedProtocol.from_header(
        {**fedavg.protocol.header(), "local_lr": 1e30}))
    with pytest.raises(UserError, match=r"^calibration: auxiliary batch 1: the client's update of '\w+\.weight' has "
                                        r"NaN or Inf entries: its local training diverged"):
        calibrate_like(diverging, ds, exclude_patients=b2.patient_ids, images=1, attack_settings={"iterations": 2})


# ------------------------------------------------------------------------------------------ command line
def test_cli_trains_a_prior_and_the_attack_reports_with_and_without_it(tmp_path):
    obs = tmp_path / "cap" / "obs.pt"
    gradleak("capture", "--data", "phantoms:n=24", "--size", 16, "--indices", "0,1", "--arch", "lenet_zhu",
             "--out", obs)
    truth = tmp_path / "cap" / "truth.npz"
    prior = tmp_path / "prior.safetensors"
    p = gradleak("prior", "train", "--data", "phantoms:n=24", "--size", 16, "--out", prior, "--steps", 20,
                 "--batch-size", 8, "--width", 4, "--exclude-from", truth, "--quiet")
    assert "patients excluded" in p.stdout and prior.is_file()
    p = gradleak("prior", "inspect", prior)
    assert json.loads(p.stdout)["format"] == FORMAT
    # calibrated to the observation's conditions, on auxiliary patients only; an explicit setting wins
    calibrated = tmp_path / "calibrated.safetensors"
    p = gradleak("prior", "train", "--data", "phantoms:n=24", "--size", 16, "--out", calibrated, "--steps", 5,
                 "--batch-size", 4, "--width", 4, "--exclude-from", truth, "--calibrate-like", obs,
                 "--calibrate-images", 1, "--calibrate-iterations", 5, "--degradation", "brightness=0.05",
                 "--loss", "l2", "--quiet")
    assert "calibrated degradation: scale_factor=4, latent_noise=" in p.stdout and "L2 on a held-out" in p.stdout
    _, header = load_prior_file(calibrated)
    cal = header["training"]["calibration"]
    assert cal["images"] == 2 and not set(cal["patients"]) & {"phantom0"} and cal["arch"] == "lenet_zhu"
    assert header["degradation"]["brightness"] == 0.05 and header["training"]["loss"] == "l2"
    # a prior for auto's inverted images starts from the leak's settings; an explicit setting still wins
    for_auto = tmp_path / "for_auto.safetensors"
    gradleak("prior", "train", "--data", "phantoms:n=24", "--size", 16, "--out", for_auto, "--steps", 2,
             "--width", 4, "--exclude-from", truth, "--for-attack", "auto", "--degradation", "pixel_noise=0.03",
             "--quiet")
    _, header = load_prior_file(for_auto)
    assert header["degradation"] == {**LEAK_DEGRADATION, "pixel_noise": 0.03}
    assert header["degradation"]["scale_factor"] == 2 and "calibration" not in header["training"]
    out = tmp_path / "attack"
    p = gradleak("attack", "--observation", obs, "--attack", "rog", "--out", out, "--truth", truth,
                 "--iterations", 3, "--restarts", 1, "--prior", prior, "--quiet")
    assert "without post-processing: PSNR" in p.stdout and "with post-processing:" in p.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert "without_postprocessing" in m and m["threat_model"]["postprocessing"].startswith("learned prior")
    z = np.load(out / "reconstruction.npz")
    assert z["images"].shape == z["images_without_postprocessing"].shape == (2, 1, 16, 16)

    # a prior that saw the attacked patients is refused, in one line, before any output is written
    leaky = tmp_path / "leaky.safetensors"
    gradleak("prior", "train", "--data", "phantoms:n=24", "--size", 16, "--out", leaky, "--steps", 2,
             "--width", 4, "--quiet")
    p = gradleak("attack", "--observation", obs, "--attack", "rog", "--out", tmp_path / "no", "--truth", truth,
                 "--iterations", 3, "--prior", leaky, "--quiet", check=False)
    assert_user_error(p, "attacked patient", "phantom0")
    assert not (tmp_path / "no").exists()
    bad = tmp_path / "bad.safetensors"
    bad.write_text("not a prior")
    p = gradleak("attack", "--observation", obs, "--attack", "rog", "--out", tmp_path / "no", "--prior", bad,
                 "--quiet", check=False)
    assert_user_error(p, str(bad))


def test_experiment_config_prior_key(tiny_prior, tmp_path):
    from gradleak.experiment import config
    from gradleak.experiment.run import run_experiment

    cfg = config.from_dict({"output_dir": str(tmp_path), "data": {"source": "phantoms", "n": 24, "size": 16},
                            "capture": {"arch": "lenet_zhu", "batch_size": 2, "indices": [0, 1]},
                            "attack": {"name": "rog", "prior": str(tiny_prior[0]),
                                       "settings": {"iterations": 3, "restarts": 1}}})
    folder, metrics = run_experiment(cfg, progress=False)
    assert {"psnr", "ssim"} <= set(metrics["without_postprocessing"])
    assert "post-processing: learned prior" in (folder / "log.txt").read_text()
    # indices 0 and 1 are phantom0, which the tiny prior excluded; index 8 is phantom2, which trained it
    leaky = config.from_dict({**cfg, "capture": {**cfg["capture"], "indices": [8]}})
    with pytest.raises(UserError, match="attacked patient"):
        run_experiment(leaky, progress=False)
