import time

import pytest
import torch

from gradleak.attacks import labels as label_inference
from gradleak.attacks import run_attack
from gradleak.attacks.base import Budget, step_decay
from gradleak.attacks.simulate import Simulator
from gradleak.capture import capture
from gradleak.data import load_dataset
from gradleak.federated import Protocol, client_update
from gradleak.metrics import score
from gradleak.models import build

from factories import tiny_observation


def test_sanity_lenet_zhu_single_phantom_is_recovered_exactly():
    """DLG's known-perfect case: sigmoid LeNet, one 32 px image, no obfuscation, label inferred."""
    ds = load_dataset("phantoms", size=32)
    batch = ds.batch([3])
    obs, _ = capture(batch.images, batch.labels, arch="lenet_zhu", protocol=Protocol(), labels_known=False)
    rec = run_attack("ig", obs, {"iterations": 300, "restarts": 1, "tv_weight": 0.0}, seed=0, progress=False)
    assert rec.threat_model["labels"] == "idlg"
    m = score(batch.images, batch.labels, rec.images, rec.labels)
    assert m["label_accuracy"] == 1.0
    assert m["psnr"] > 30.0, m["psnr"]


def test_simulator_reproduces_the_clients_update_exactly():
    for proto in (Protocol(), Protocol(algorithm="fedavg", local_steps=3, local_lr=0.1, local_batch_size=1)):
        obs, truth = tiny_observation("lenet_zhu", n=2, protocol=proto)
        sim = Simulator(obs)
        again = sim.update(truth.images, truth.labels)
        for k, v in obs.update.items():
            assert torch.allclose(again[k], v, atol=1e-6), k


def test_simulator_uses_batch_statistics_like_a_training_client():
    obs, truth = tiny_observation("convnet", n=3, labels_known=True)
    sim = Simulator(obs)
    again = sim.update(truth.images, truth.labels)
    for k, v in obs.update.items():
        assert torch.allclose(again[k], v, atol=1e-5), k


@pytest.mark.parametrize("arch", ["lenet5", "lenet_zhu", "convnet"])
@pytest.mark.parametrize("label", [0, 1, 2])
def test_idlg_label_is_exact_for_one_image(arch, label):
    images = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(label))
    obs, _ = capture(images, torch.tensor([label]), arch=arch, num_classes=3, protocol=Protocol(),
                     model_seed=label)
    y, method = label_inference.infer(Simulator(obs), None)
    assert method == "idlg" and y.tolist() == [label]


def test_idlg_reads_fedavg_weight_deltas_with_the_right_sign():
    images = torch.rand(1, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    obs, _ = capture(images, torch.tensor([1]), arch="lenet5", protocol=Protocol("fedavg", 3, 0.05))
    assert label_inference.infer(Simulator(obs), None)[0].tolist() == [1]


def test_count_based_labels_on_a_known_batch():
    ds = load_dataset("phantoms", size=32)
    hits = total = 0
    for seed, idx in enumerate([[0, 1, 2, 3], [4, 9, 13, 20], [30, 31, 40, 50, 60, 70]]):
        b = ds.batch(idx)
        obs, _ = capture(b.images, b.labels, arch="lenet5", protocol=Protocol(), model_seed=seed)
        y, method = label_inference.infer(Simulator(obs), None)
        assert method == "count" and len(y) == len(idx)
        truth = sorted(b.labels.tolist())
        hits += sum(min(truth.count(c), y.tolist().count(c)) for c in (0, 1))
        total += len(idx)
    assert hits / total >= 0.85


def test_same_seed_same_reconstruction_and_restarts_run_batched():
    obs, _ = tiny_observation("lenet_zhu", n=2)
    a = run_attack("ig", obs, {"iterations": 5, "restarts": 3}, seed=4, progress=False)
    b = run_attack("ig", obs, {"iterations": 5, "restarts": 3}, seed=4, progress=False)
    c = run_attack("ig", obs, {"iterations": 5, "restarts": 3}, seed=5, progress=False)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert len(a.extras["restart_losses"]) == 3
    assert a.loss == min(a.extras["restart_losses"])
    assert a.images.shape == (2, 1, 16, 16) and 0 <= a.images.min() and a.images.max() <= 1


def test_time_budget_stops_the_attack():
    obs, _ = tiny_observation("lenet5", n=1, size=32)
    t = time.perf_counter()
    rec = run_attack("ig", obs, {"iterations": None, "time_budget": 1.0, "restarts": 1}, progress=False)
    assert time.perf_counter() - t < 10
    assert rec.iterations >= 1 and rec.seconds >= 1.0


def test_budget_fraction_follows_the_nearer_limit():
    b = Budget(iterations=10, time_budget=None, progress=False)
    seen = [round(b.fraction, 2) for _ in b]
    assert seen[0] == 0.0 and seen[-1] == 0.9 and b.done == 10
    assert step_decay(0.0) == 1.0 and step_decay(0.5) == pytest.approx(0.1) and step_decay(0.9) == pytest.approx(1e-3)


def test_attack_package_never_imports_the_data_package():
    import ast
    import pathlib

    import gradleak.attacks as attacks

    for path in pathlib.Path(attacks.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                mod = "." * node.level + (node.module or "")
                assert "data" not in mod.split(".") and "capture" not in mod.split("."), (path, mod)
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("gradleak.data") for a in node.names), path


@pytest.mark.parametrize("shape", [(40, 300), (300, 40)])
def test_lowrank_denoise_is_the_thin_svd_projection_on_either_side(shape):
    # the projection on the top singular vectors, read from the shorter side's Gram matrix, equals the
    # thin SVD's; a vector, or a matrix with a side not larger than the rank, is returned as it was
    from gradleak.attacks.aware import lowrank_denoise
    g = torch.Generator().manual_seed(0)
    t = (torch.randn(shape[0], 3, generator=g) @ torch.randn(3, shape[1], generator=g)
         + 0.3 * torch.randn(shape, generator=g))
    bias, narrow = torch.randn(7, generator=g), torch.randn(3, 50, generator=g)
    out = lowrank_denoise({"w": t, "b": bias, "n": narrow}, 3)
    u, sv, vh = torch.linalg.svd(t.double(), full_matrices=False)
    expected = (u[:, :3] * sv[:3]) @ vh[:3]
    assert out["w"].dtype == t.dtype and torch.allclose(out["w"].double(), expected, atol=1e-5)
    assert torch.linalg.matrix_rank(out["w"].double(), rtol=1e-6) == 3
    assert out["b"] is bias and out["n"] is narrow
