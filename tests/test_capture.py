"""The one capture path (CLI, experiment cell, calibration), the truth file's observation digest, and the
observation file's resource limits, on tiny phantoms and the real CLI."""

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from test_cli import assert_user_error, gradleak

from factories import tiny_observation
from gradleak import observation
from gradleak.capture import DEFAULT_BATCH_SIZE, capture_batch, check_truth, load_truth, save_truth
from gradleak.errors import UserError
from gradleak.federated import Protocol
from gradleak.models import build
from gradleak.models.checkpoint import save_model

PHANTOMS = "phantoms:n=24"


def _model_file(path, arch="lenet_zhu", size=32, seed=5):
    model = build(arch, 2, 1, size, seed=seed)
    header = {"arch": arch, "num_classes": 2, "in_channels": 1, "image_size": size}
    return save_model(path, header, model.state_dict(), round=3), model.state_dict()


# ------------------------------------------------------------------------------------------ capture_batch
def test_capture_batch_draws_the_default_batch_per_client_and_records_its_provenance():
    c = capture_batch(PHANTOMS, protocol=Protocol(), size=16, seed=1)
    assert DEFAULT_BATCH_SIZE == 4
    assert c.observation.num_images == 4 and c.truth.images.shape == (4, 1, 16, 16)
    assert c.observation.meta["indices"] == c.truth.indices and c.observation.meta["data"]["source"] == "phantoms"
    assert c.observation.model["arch"] == "lenet5" and c.dataset.size == 16
    two = capture_batch(PHANTOMS, protocol=Protocol(num_clients_averaged=2), batch_size=3, size=16, seed=1)
    assert two.observation.num_images == 6 and two.observation.protocol.images_per_client == 3
    with pytest.raises(UserError, match="the indices give 3 images, which 2 clients cannot share evenly"):
        capture_batch(PHANTOMS, protocol=Protocol(num_clients_averaged=2), indices=[0, 1, 2], size=16)


def test_capture_batch_takes_size_weights_and_normalisation_from_a_model_file(tmp_path):
    path, state = _model_file(tmp_path / "model.pt", size=32)
    c = capture_batch(PHANTOMS, protocol=Protocol(), batch_size=2, model_state=path)
    obs = c.observation
    assert obs.model["image_size"] == 32 and c.truth.images.shape[-1] == 32  # size from the model file
    assert obs.model["arch"] == "lenet_zhu"  # arch from the model file
    assert all(torch.equal(obs.global_state[k], state[k]) for k in state)
    assert obs.meta["model_state"] == str(path) and obs.meta["model_round"] == 3
    with pytest.raises(UserError, match="arch 'lenet_zhu', but the config has arch 'lenet5'"):
        capture_batch(PHANTOMS, protocol=Protocol(), model_state=path, arch="lenet5", where="the config")
    with pytest.raises(UserError, match="image_size 32, but the command line and data has image_size 16"):
        capture_batch(PHANTOMS, protocol=Protocol(), model_state=path, size=16)


def test_an_experiment_cell_captures_through_the_same_path(tmp_path):
    from gradleak.experiment import config
    from gradleak.experiment.run import run_experiment

    cfg = config.from_dict({"output_dir": str(tmp_path / "exp"), "seed": 2, "data": {"source": "phantoms", "n": 24,
                                                                                    "size": 16},
                            "capture": {"arch": "lenet_zhu", "batch_size": 2,
                                        "obfuscation": ["relative_gaussian:sigma0=0.1"]},
                            "attack": {"name": "ig", "settings": {"iterations": 1, "restarts": 1}}})
    folder, _ = run_experiment(cfg, progress=False)
    seen = observation.load(folder / "observation.pt")
    direct = capture_batch({"source": "phantoms", "n": 24, "size": 16}, protocol=Protocol(), seed=2,
                           arch="lenet_zhu", batch_size=2, obfuscations=["relative_gaussian:sigma0=0.1"]).observation
    assert seen.meta == direct.meta and seen.protocol == direct.protocol
    assert all(torch.equal(seen.update[k], direct.update[k]) for k in direct.update)
    assert load_truth(folder / "truth.npz").observation_digest == observation.digest(direct)


# ------------------------------------------------------------------------------------------ truth digest
def test_the_digest_ties_a_truth_file_to_its_capture_and_survives_obfuscation(tmp_path):
    a = capture_batch(PHANTOMS, protocol=Protocol(), batch_size=2, size=16, seed=1)
    b = capture_batch(PHANTOMS, protocol=Protocol(), batch_size=2, size=16, seed=2)
    a.save(tmp_path / "a.pt", tmp_path / "a.npz")
    back = observation.load(tmp_path / "a.pt")
    assert observation.digest(back) == observation.digest(a.observation) == a.truth.observation_digest
    assert a.truth.observation_digest != b.truth.observation_digest  # another batch
    truth = load_truth(tmp_path / "a.npz", back, observation_path="a.pt")  # its own observation: accepted
    assert truth.observation_digest == a.truth.observation_digest
    back.update = {k: v.sign() for k, v in back.update.items()}  # what 'gradleak obfuscate' changes
    back.obfuscation = back.obfuscation + [{"name": "sign"}]
    check_truth(truth, back, truth_path="a.npz")
    b.save(tmp_path / "b.pt", tmp_path / "b.npz")
    with pytest.raises(UserError, match="b.npz belongs to another capture than a.pt") as e:
        load_truth(tmp_path / "b.npz", back, observation_path="a.pt")
    assert "\n" not in str(e.value)
    # a truth file written before digests existed: accepted, with one warning line
    save_truth(a.truth.__class__(**{**a.truth.__dict__, "observation_digest": None}), tmp_path / "old.npz")
    lines = []
    check_truth(load_truth(tmp_path / "old.npz"), back, truth_path="old.npz", warn=lines.append)
    assert len(lines) == 1 and "old.npz" in lines[0] and "no digest" in lines[0]


def test_truth_files_that_cannot_be_right_are_one_line_errors(tmp_path):
    a = capture_batch(PHANTOMS, protocol=Protocol(), batch_size=2, size=16, seed=1)
    a.save(tmp_path / "a.pt", tmp_path / "a.npz")
    z = dict(np.load(tmp_path / "a.npz"))
    for name, change, fragment in [("frac", {"labels": np.array([0.5, 1.0])}, "whole class numbers"),
                                   ("nan", {"images": np.full_like(z["images"], np.nan)}, "NaN or Inf"),
                                   ("short", {"labels": np.array([0])}, r"one class per image \(2\)")]:
        np.savez(tmp_path / f"{name}.npz", **{**z, **change})
        with pytest.raises(UserError, match=fragment):
            load_truth(tmp_path / f"{name}.npz")
    np.savez(tmp_path / "small.npz", **{**z, "images": z["images"][:, :, :8, :8]})
    with pytest.raises(UserError, match=r"small.npz: images have shape \(2, 1, 8, 8\) but a.pt holds 2 images"):
        load_truth(tmp_path / "small.npz", a.observation, observation_path="a.pt")


def test_attack_refuses_the_truth_file_of_another_capture(tmp_path):
    cfg = tmp_path / "exp.yaml"
    cfg.write_text(f"""
output_dir: {tmp_path / 'runs'}
data: {{source: phantoms, size: 16, n: 24}}
capture: {{arch: lenet_zhu, batch_size: 2}}
attack: {{name: ig, settings: {{iterations: 1, restarts: 1}}}}
""")
    for seed in (1, 2):  # two captures of different batches
        gradleak("run", cfg, "--set", f"seed={seed}", "--set", f"name=c{seed}", "--quiet")
    (first,), (second,) = (list((tmp_path / "runs").glob(f"c{seed}-*")) for seed in (1, 2))
    obs, own, other = first / "observation.pt", first / "truth.npz", second / "truth.npz"
    assert_user_error(gradleak("attack", "--observation", obs, "--attack", "ig", "--iterations", 1, "--restarts", 1,
                               "--truth", other, "--out", tmp_path / "a", "--quiet", check=False),
                      f"{second.name}/truth.npz", "another capture", f"{first.name}/observation.pt")
    assert not (tmp_path / "a").exists()
    p = gradleak("attack", "--observation", obs, "--attack", "ig", "--iterations", 1, "--restarts", 1,
                 "--truth", own, "--out", tmp_path / "a", "--quiet")
    assert (tmp_path / "a" / "metrics.json").is_file() and "warning" not in p.stderr


@pytest.mark.parametrize("clients", [1, 2])
def test_a_client_whose_local_training_diverged_is_a_one_line_error_and_writes_nothing(tmp_path, clients):
    # five local steps of learning rate 1e30 overflow the FedAvg delta to NaN
    out = tmp_path / "cap"
    p = gradleak("capture", "--data", "phantoms", "--size", 16, "--batch-size", 4 // clients,
                 "--num-clients-averaged", clients, "--algorithm", "fedavg", "--local-steps", 5, "--local-lr", 1e30,
                 "--out", out / "obs.pt", check=False)
    assert_user_error(p, "client's update of '" if clients == 1 else "client 1 of 2's update of '",
                      "has NaN or Inf entries", "local training diverged", "5 steps of learning rate 1e+30",
                      "lower the local learning rate")
    assert not out.exists() or not any(out.iterdir())


def test_a_model_sent_with_nan_weights_is_refused_before_any_client_runs(tmp_path):
    path, state = _model_file(tmp_path / "model.pt", size=16)
    state = {k: v.clone() for k, v in state.items()}
    state["classifier.weight"][0, 0] = float("nan")
    save_model(path, {"arch": "lenet_zhu", "num_classes": 2, "in_channels": 1, "image_size": 16}, state, round=3)
    with pytest.raises(UserError, match="the model the server sent has NaN or Inf entries in 'classifier.weight'"):
        capture_batch(PHANTOMS, protocol=Protocol(), batch_size=2, model_state=path)
    # a FedSGD gradient that overflows names neither local steps nor a learning rate
    _, state = _model_file(tmp_path / "m2.pt", arch="lenet5", size=16)
    big = {k: v * 1e30 for k, v in state.items()}  # finite weights whose products overflow
    save_model(tmp_path / "m2.pt", {"arch": "lenet5", "num_classes": 2, "in_channels": 1, "image_size": 16}, big,
               round=3)
    with pytest.raises(UserError, match=r"the client's update of '.*' has NaN or Inf entries: its loss or gradient "
                                        r"overflowed \(the model's weights or the images too large\)"):
        capture_batch(PHANTOMS, protocol=Protocol(), batch_size=2, model_state=tmp_path / "m2.pt")


# ------------------------------------------------------------------------------------------ resource limits
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
p = subprocess.run([sys.executable, "-m", "gradleak.cli", *sys.argv[1:]], capture_output=True, text=True)
print(json.dumps({"rc": p.returncode, "stderr": p.stderr, "seconds": time.perf_counter() - t,
                  "max_rss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _measured(*args):
    """Run the CLI in a fresh parent whose only child it is: exit code, stderr, seconds, peak memory."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, *map(str, args)], capture_output=True, text=True,
                         timeout=600)
    return json.loads(out.stdout)


@pytest.mark.parametrize("arch,image_size,fragment", [
    ("lenet_zhu", 100_000, "model.image_size must be an integer from 1 to 4096, got 100000"),
    # under the cap but 137 GB of fc1 weights if built for real: shapes are compared on the meta device
    ("lenet5", 4096, "global_state['fc1.weight'] has shape (512, 1024), lenet5 expects (512, 67108864)"),
])
def test_a_header_naming_a_huge_model_is_refused_fast_in_little_memory(tmp_path, arch, image_size, fragment):
    obs, _ = tiny_observation(arch, n=2, size=16)
    raw = obs.to_dict()
    raw["model"]["image_size"] = image_size
    path = tmp_path / "crafted.pt"
    torch.save(raw, path)
    t = time.perf_counter()
    r = _measured("attack", "--observation", path, "--out", tmp_path / "a", "--quiet")
    lines = [line for line in r["stderr"].splitlines() if line.strip()]
    assert r["rc"] == 2 and len(lines) == 1 and fragment in lines[0], r
    assert r["max_rss_kb"] < 1_000_000, r  # torch itself takes a few hundred MB; the model nothing
    assert time.perf_counter() - t < 120
    assert not (tmp_path / "a").exists()


def test_the_cli_writes_the_same_protocol_header_as_before(tmp_path):
    gradleak("capture", "--data", PHANTOMS, "--size", 16, "--arch", "lenet_zhu", "--batch-size", 2,
             "--out", tmp_path / "obs.pt")
    raw = torch.load(tmp_path / "obs.pt", weights_only=True)
    assert raw["protocol"] == {"algorithm": "fedsgd", "local_steps": 1, "local_lr": 0.0, "local_batch_size": 2,
                               "sends_buffers": False, "per_example_clip": None, "num_clients_averaged": 1,
                               "update_is": "gradient", "num_images": 2, "images_per_client": 2}
    assert list(raw["protocol"]) == ["algorithm", "local_steps", "local_lr", "local_batch_size", "sends_buffers",
                                     "per_example_clip", "num_clients_averaged", "update_is", "num_images",
                                     "images_per_client"]
