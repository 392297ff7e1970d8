"""Re-identification, MS-SSIM and LPIPS: galleries where the answer is known, and reference values."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradleak.metrics import lpips, lpips_status, ms_ssim, ms_ssim_config, score
from gradleak.metrics.image import MS_SSIM_WEIGHTS
from gradleak.metrics.reid import (AutoencoderEmbedder, ClassifierEmbedder, Gallery, distance_matrix, reidentify,
                                   train_autoencoder)


# ------------------------------------------------------------------------------------------------ MS-SSIM
def _noisy_pair(seed, shape, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, shape[-2]), torch.linspace(0, 1, shape[-1]), indexing="ij")
    a = (0.5 * a + 0.5 * torch.sin(8 * xx * yy)[None, None]).clamp(0, 1)
    return a, (a + noise * torch.randn(shape, generator=g)).clamp(0, 1)


@pytest.mark.parametrize("shape", [(2, 1, 176, 176), (1, 1, 181, 200), (1, 3, 192, 177)])
def test_standard_ms_ssim_matches_pytorch_msssim(shape):
    pm = pytest.importorskip("pytorch_msssim")
    a, b = _noisy_pair(0, shape)
    ours = ms_ssim(a, b, weights=MS_SSIM_WEIGHTS, window=11, sigma=1.5)
    ref = pm.ms_ssim(a.double(), b.double(), data_range=1.0, size_average=False)
    assert torch.allclose(ours.double(), ref, atol=1e-5), (ours, ref)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), noise=st.floats(0.01, 0.4), levels=st.integers(2, 4),
       window=st.sampled_from([3, 5]))
def test_small_window_ms_ssim_matches_pytorch_msssim(seed, noise, levels, window):
    """The same formula with any window and number of scales (pytorch_msssim needs > 16 windows a side)."""
    pm = pytest.importorskip("pytorch_msssim")
    a, b = _noisy_pair(seed, (1, 1, 96, 96), noise)
    w = list(MS_SSIM_WEIGHTS[:levels])
    ours = ms_ssim(a, b, weights=w, window=window, sigma=1.0)
    ref = pm.ms_ssim(a.double(), b.double(), data_range=1.0, size_average=False, weights=w, win_size=window,
                     win_sigma=1.0)
    assert torch.allclose(ours.double(), ref, atol=1e-5)


def test_ms_ssim_adapts_to_small_images():
    assert ms_ssim_config(224)["scales"] == 5 and ms_ssim_config(224)["window"] == 11
    assert ms_ssim_config(64) == {**ms_ssim_config(64), "scales": 3, "window": 11}
    assert ms_ssim_config(32)["window"] == 7 and ms_ssim_config(32)["scales"] == 3
    assert ms_ssim_config(16)["scales"] == 2
    for side in (16, 28, 32, 64, 128):
        c = ms_ssim_config(side)
        assert side // 2 ** (c["scales"] - 1) >= c["window"]
        assert sum(c["weights"]) == pytest.approx(1.0)
        a, b = _noisy_pair(1, (2, 1, side, side))
        assert torch.allclose(ms_ssim(a, a), torch.ones(2), atol=1e-6)
        assert (ms_ssim(a, b) < 1).all()
    with pytest.raises(ValueError):
        ms_ssim_config(6)


def test_score_reports_ms_ssim_and_why_lpips_is_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("GRADLEAK_LPIPS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    a, b = _noisy_pair(2, (2, 1, 32, 32))
    out = score(a, None, b, None)
    assert 0 < out["ms_ssim"] < 1 and "3 scale" in out["metric_variants"]["ms_ssim"]
    if lpips_status() is not None:
        assert out["lpips"] is None and "not on disk" in out["lpips_note"]


def test_lpips_runs_from_weight_files_on_disk(monkeypatch, tmp_path):
    """Weight files in the two published layouts (random values here: no weights are downloaded)."""
    monkeypatch.setenv("GRADLEAK_LPIPS_DIR", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert lpips_status() is not None and "alexnet" in lpips_status()
    g = torch.Generator().manual_seed(0)
    shapes = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
    backbone = {}
    for i, (o, c, k) in shapes.items():
        backbone[f"features.{i}.weight"] = torch.randn(o, c, k, k, generator=g) * 0.05
        backbone[f"features.{i}.bias"] = torch.zeros(o)
    linear = {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g)
              for k, c in enumerate([64, 192, 384, 256, 256])}
    torch.save(backbone, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save(linear, tmp_path / "alex.pth")
    assert lpips_status() is None
    a, b = _noisy_pair(3, (2, 1, 32, 32), 0.3)
    d = lpips(a, b)
    assert d.shape == (2,) and (d > 0).all()
    assert torch.allclose(lpips(a, a), torch.zeros(2), atol=1e-6)
    assert torch.allclose(lpips(a, b), lpips(b, a), atol=1e-5)
    assert score(a, None, b, None)["lpips"] == pytest.approx(float(d.mean()), rel=1e-5)


# ------------------------------------------------------------------------------------------------ re-id
def _flat_gallery(levels, patients, labels=None, size=16):
    images = torch.tensor(levels, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, 1, size, size).clone()
    return Gallery(images, list(patients), torch.tensor(labels) if labels is not None else None,
                   [f"img{i}" for i in range(len(levels))], list(range(len(levels))))


def test_reid_on_a_gallery_where_the_answer_is_known():
    # flat grey images: pixel distance orders the gallery by |intensity - query|
    levels = [0.00, 0.10, 0.20, 0.30, 0.40, 0.50, 0.60, 0.70]
    patients = ["A", "A", "B", "B", "C", "C", "D", "E"]
    gallery = _flat_gallery(levels, patients)
    size = 16
    q = lambda v: torch.full((1, 1, size, size), v)  # noqa: E731
    # query 0: the original (index 2, patient B) reconstructed nearly exactly
    # query 1: original index 0 (patient A), but the reconstruction lies nearest image 1 (also A)
    # query 2: original index 7 (patient E); images by distance 4(C) 5(C) 3(B) 6(D) 2(B) 7(E) 1(A) 0(A),
    #          so the true image is 6th but patient E is only the 4th distinct patient
    recs = torch.cat([q(0.21), q(0.09), q(0.44)])
    out = reidentify(recs, [2, 0, 7], gallery, distances=["mse", "ssim"], leave_out=False)
    r = out["by_distance"]["mse"]
    assert r["true_image_rank"] == [1, 2, 6]
    assert r["true_patient_rank"] == [1, 1, 4]
    assert (r["top1_hits"], r["top5_hits"]) == (2, 3)
    assert r["top1"] == pytest.approx(2 / 3) and r["top5"] == 1.0
    assert r["iip_hits"] == 1  # only query 0 has its original as nearest neighbour
    assert out["gallery"] == {"images": 8, "patients": 5}
    assert out["chance_top1"] == pytest.approx((2 / 8 + 2 / 8 + 1 / 8) / 3)
    assert out["strongest"]["top1_hits"] == 2
    assert "Yin et al. 2021" in out["variants"]["iip"]

    # leave-the-image-out: the patient must be found through its *other* images; E has none
    lo = reidentify(recs, [2, 0, 7], gallery, distances=["mse"])
    r = lo["by_distance"]["mse"]
    assert lo["leave_the_image_out"] and lo["num_with_other_images"] == 2 and lo["without_other_images"] == 1
    assert r["true_patient_rank"] == [1, 1, None]  # B via image 3, A via image 1
    assert (r["n"], r["top1_hits"], r["top1"]) == (2, 2, 1.0)
    assert r["true_image_rank"] == [1, 2, 6] and r["iip_hits"] == 1 and r["iip_n"] == 3  # image level unchanged
    assert lo["chance_top1"] == pytest.approx(1 / 7)  # one other image of the patient among 7


def test_leave_the_image_out_excludes_the_attacked_image():
    """A perfect reconstruction finds its own image, but that is not patient re-identification: with the
    image left out, the patient is found only when its other image is nearer than the other patients'."""
    levels = [0.0, 0.9, 0.05, 0.5]
    gallery = _flat_gallery(levels, ["A", "A", "B", "C"])
    exact = torch.full((1, 1, 16, 16), 0.0)  # the attacked image 0 itself
    kept = reidentify(exact, [0], gallery, distances=["mse"], leave_out=False)["by_distance"]["mse"]
    assert kept["top1_hits"] == 1 and kept["iip_hits"] == 1
    out = reidentify(exact, [0], gallery, distances=["mse"])
    r = out["by_distance"]["mse"]
    # image 0 left out: nearest is image 2 (B), then 3 (C), then 1 (A): patient A only third
    assert r["true_patient_rank"] == [3] and r["top1_hits"] == 0 and r["top5_hits"] == 1
    assert r["iip_hits"] == 1 and r["true_image_rank"] == [1]  # the image-level rate still sees the image
    # an exact copy of the attacked image under the same patient is left out too
    dup = _flat_gallery([0.0, 0.0, 0.05, 0.9], ["A", "A", "B", "A"])
    r = reidentify(exact, [0], dup, distances=["mse"])["by_distance"]["mse"]
    assert r["true_patient_rank"] == [2]


def test_chance_level_of_a_random_ranking():
    from gradleak.metrics.reid import chance_top_k

    c = chance_top_k(1, [1] * 9, ks=(1, 5))
    assert c[1] == pytest.approx(0.1) and c[5] == pytest.approx(0.5, abs=2e-3)  # 10 patients, one image each
    c = chance_top_k(3, [1, 1, 1], ks=(1, 5))
    assert c[1] == pytest.approx(0.5) and c[5] == pytest.approx(1.0)
    # Monte Carlo check with unequal patients
    rng = np.random.default_rng(0)
    counts = [2, 1, 4, 3, 1, 2, 5, 1]
    own, hits = 2, 0
    owner = np.repeat(np.arange(len(counts) + 1), [own] + counts)
    for _ in range(20000):
        perm = owner[rng.permutation(len(owner))]
        _, first = np.unique(perm, return_index=True)
        hits += int((first < first[0]).sum() < 3)
    assert chance_top_k(own, counts, ks=(3,))[3] == pytest.approx(hits / 20000, abs=0.01)


def test_iip_searches_only_the_original_label_while_patient_rates_use_the_whole_gallery():
    levels = [0.10, 0.30, 0.50]
    gallery = _flat_gallery(levels, ["P", "Q", "R"], labels=[0, 1, 0])
    rec = torch.full((1, 1, 16, 16), 0.25)  # nearest overall: 0.30 (Q, label 1); nearest label-0: 0.10
    r = reidentify(rec, [0], gallery, distances=["mse"])["by_distance"]["mse"]
    assert r["top1_hits"] == 0 and r["iip_hits"] == 1


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(6, 30), q=st.integers(1, 4), n_pat=st.integers(2, 6))
def test_reid_invariants(seed, n, q, n_pat):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 12, 12, generator=g)
    pids = [f"p{int(i)}" for i in torch.randint(n_pat, (n,), generator=g)]
    gallery = Gallery(images, pids, torch.randint(2, (n,), generator=g), indices=list(range(n)))
    pos = torch.randperm(n, generator=g)[:q].tolist()
    out = reidentify(images[pos].clone(), pos, gallery, distances=["mse"], leave_out=False)["by_distance"]["mse"]
    # exact reconstructions: rank 1, patient found, IIP hit
    assert out["true_image_rank"] == [1] * q and out["top1"] == 1.0 and out["iip"] == 1.0
    noisy = (images[pos] + 0.8 * torch.randn(q, 1, 12, 12, generator=g)).clamp(0, 1)
    r = reidentify(noisy, pos, gallery, distances=["mse"], leave_out=False)["by_distance"]["mse"]
    assert all(1 <= k <= n for k in r["true_image_rank"])
    assert all(p <= i for p, i in zip(r["true_patient_rank"], r["true_image_rank"]))
    assert r["top1"] <= r["top5"]
    # leave-the-image-out: only patients with another image count, and the image level is unchanged
    lo = reidentify(noisy, pos, gallery, distances=["mse"])
    rl = lo["by_distance"]["mse"]
    others = [pids.count(pids[t]) > 1 for t in pos]
    assert rl["n"] == sum(others) and [x is not None for x in rl["true_patient_rank"]] == others
    assert rl["true_image_rank"] == r["true_image_rank"] and rl["iip_hits"] == r["iip_hits"]
    if rl["n"]:
        assert rl["top1"] <= rl["top5"] and 0 < lo["chance_top1"] <= lo["chance_top5"] <= 1


def test_ssim_distance_prefers_structure():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 16, 16, generator=g)
    d = distance_matrix(a, a, "ssim")
    assert torch.allclose(torch.diagonal(d), torch.zeros(3, dtype=torch.float64), atol=1e-6)
    assert (d.argmin(1) == torch.arange(3)).all()


def test_autoencoder_embedding_is_seeded_saved_and_reidentifies(tmp_path):
    from gradleak.data import load_dataset

    ds = load_dataset("phantoms:n=48", size=16)
    b = ds.batch(range(len(ds)))
    e1 = train_autoencoder(b.images, seed=3, steps=40)
    e2 = train_autoencoder(b.images, seed=3, steps=40)
    assert torch.equal(e1(b.images[:4]), e2(b.images[:4]))
    path = e1.save(tmp_path / "ae.pt")
    e3 = AutoencoderEmbedder.load(path)
    assert torch.equal(e1(b.images[:4]), e3(b.images[:4]))
    gallery = Gallery(b.images, b.patient_ids, b.labels, b.names, list(range(len(ds))))
    pos = [1, 17, 30]
    recs = (b.images[pos] + 0.02 * torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    out = reidentify(recs, pos, gallery, embedder=e3, leave_out=False)
    assert out["by_distance"]["embedding"]["top1"] == 1.0  # the image itself, when it is in the gallery
    assert out["embedding"]["kind"] == "autoencoder" and "autoencoder" in out["by_distance"]["embedding"]["variant"]


def test_classifier_embedder_reads_a_model_file(tmp_path):
    from gradleak.errors import UserError
    from gradleak.models import build

    model = build("lenet5", 2, 1, 16, seed=0)
    torch.save({"model": {"arch": "lenet5", "num_classes": 2, "in_channels": 1, "image_size": 16},
                "state_dict": model.state_dict()}, tmp_path / "model.pt")
    emb = ClassifierEmbedder.from_file(tmp_path / "model.pt")
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    f = emb(x)
    assert f.shape[0] == 3 and f.dim() == 2
    small = torch.nn.functional.interpolate(x, size=(16, 16), mode="area")
    assert torch.allclose(f, model.eval().penultimate(small).flatten(1), atol=1e-6)
    (tmp_path / "junk.pt").write_text("no")
    with pytest.raises(UserError, match="junk.pt"):
        ClassifierEmbedder.from_file(tmp_path / "junk.pt")


def test_gallery_round_trip(tmp_path):
    g = _flat_gallery([0.1, 0.2], ["a", "b"], labels=[0, 1])
    g.save(tmp_path / "g.npz")
    h = Gallery.load(tmp_path / "g.npz")
    assert torch.equal(g.images, h.images) and h.patient_ids == ["a", "b"] and h.labels.tolist() == [0, 1]
    assert h.position([1, 0]) == [1, 0]
    with pytest.raises(ValueError):
        h.position([5])
    assert np.load(tmp_path / "g.npz")["images"].dtype == np.float32

    # a gallery grows by appending (a new gallery; the old one unchanged)
    more = h.extend(torch.zeros(1, 1, 16, 16), ["c"], torch.tensor([1]), ["img9"], [9])
    assert len(more) == 3 and len(h) == 2 and more.patient_ids == ["a", "b", "c"] and more.position([9]) == [2]
    assert more.labels.tolist() == [0, 1, 1]


def test_a_gallery_on_disk_scores_a_single_run(tmp_path):
    """The gallery a sweep keeps under reid/ serves the folder of one `gradleak run` as well: a seeded subset
    of the data set, the attacked patients' other images added, and an autoencoder trained once."""
    import yaml
    from test_cli import gradleak

    from gradleak.logs import recording
    from gradleak.metrics.reid import cell_reid, prepare_reid

    data = {"source": "phantoms", "size": 16, "n": 24}  # 6 patients, 4 images each
    cfg = tmp_path / "run.yaml"
    cfg.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "runs"), "data": data,
                                   "capture": {"arch": "lenet_zhu", "batch_size": 2},
                                   "attack": {"name": "ig", "settings": {"iterations": 5, "restarts": 1}}}))
    gradleak("run", cfg, "--quiet")
    (run,) = [p for p in (tmp_path / "runs").iterdir() if p.is_dir()]
    settings = {"gallery_size": 6, "seed": 0, "distances": ["mse", "embedding"], "embedding": "auto",
                "autoencoder_steps": 5}
    with recording() as rec:
        ctx = prepare_reid(tmp_path / "reid", data, settings, None)
    said = rec.lines
    assert (ctx.embedder_kind, ctx.embedder_path) == ("autoencoder", tmp_path / "reid" / "autoencoder.pt")
    assert ctx.description["images"] == 6 and ctx.description["data_set_images"] == 24
    assert len(said) == 2 and "6 of 24 images" in said[0]
    with recording() as rec:
        again = prepare_reid(tmp_path / "reid", data, settings, None)
    assert rec.lines == [] and again.gallery_path == ctx.gallery_path  # reused, nothing rebuilt

    out = cell_reid(run, ctx, ["mse", "embedding"], data)
    assert out["leave_the_image_out"] and out["num_reconstructions"] == 2
    assert out["num_with_other_images"] == 2  # every attacked patient's other images joined the gallery
    assert 6 < out["gallery"]["images"] <= 6 + 2 * 4 and out["gallery"]["data"] == "phantoms"
    assert set(out["by_distance"]) == {"mse", "embedding"} and out["embedding"]["kind"] == "autoencoder"
    # without the data set only the attacked images themselves join
    alone = cell_reid(run, ctx, ["mse"], None)
    assert alone["gallery"]["images"] <= 6 + 2 and alone["by_distance"]["mse"]["iip_n"] == 2
