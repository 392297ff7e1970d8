"""``gradleak utility`` end to end on phantoms, model files as attack victims, and the CLI's error paths."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gradleak import observation
from gradleak.errors import UserError
from gradleak.experiment import utility
from gradleak.federated.simulation import evaluate
from gradleak.models import build
from gradleak.models.checkpoint import load_model, save_model
from test_cli import assert_user_error, gradleak

TINY = """
name: tiny
threads: 1
output_dir: {out}
data: {{source: phantoms, n: 48, size: 16}}
model: {{arch: convnet, options: {{width: 4, depth: 2}}}}
federation: {{num_clients: 3, rounds: 3, local_lr: 0.05, local_batch_size: 8, engine: local}}
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short federated run on phantoms at 32 px (about 10 s on one busy core)."""
    out = tmp_path_factory.mktemp("utility")
    cfg = utility.from_dict({
        "name": "phantoms", "threads": 1, "output_dir": str(out),
        "data": {"source": "phantoms", "n": 320, "size": 32},
        "model": {"arch": "convnet", "options": {"width": 8, "depth": 3, "pool_first": True}},
        "federation": {"num_clients": 4, "rounds": 10, "local_lr": 0.1, "local_epochs": 2, "local_batch_size": 16,
                       "engine": "local"},
        "save_rounds": [1],
    })
    return utility.run_utility(cfg, progress=False)


def test_federated_training_on_phantoms_improves_over_chance(trained):
    first, final = trained["rounds"][0], trained["final"]
    assert final["roc_auc"] > 0.7 and final["roc_auc"] > first["roc_auc"]
    assert final["balanced_accuracy"] > 0.6
    assert trained["best"]["roc_auc"] >= final["roc_auc"]
    assert trained["rounds_run"] == 10 and not trained["stopped_early"]
    assert set(trained["final"]) >= {"accuracy", "roc_auc", "sensitivity", "specificity", "f1", "loss"}
    # 256 training images in 4 clients of whole patients, 64 held-out images of other patients
    assert trained["data"]["train"]["num_images"] + trained["data"]["eval"]["num_images"] == 320
    assert trained["data"]["eval_patients_in_training"] == 0
    assert sum(c["num_images"] for c in trained["partition"]["clients"]) == trained["data"]["train"]["num_images"]
    assert trained["bits_per_round"] == 4 * trained["dense_bits_per_update"]
    assert trained["epsilon"] is None and trained["threat_model"]["dp"] is None


def test_the_experiment_folder_holds_json_curves_and_loadable_models(trained):
    folder = Path(trained["folder"])
    assert folder.is_dir() and not list(folder.parent.glob(".*.partial"))
    names = {p.name for p in folder.iterdir()}
    assert {"utility.json", "learning_curves.png", "model.pt", "model_r1.pt", "config.yaml", "log.txt",
            "versions.json"} <= names
    on_disk = json.loads((folder / "utility.json").read_text())
    assert on_disk["format"] == "gradleak-utility/1" and on_disk["final"]["confusion"] == trained["final"]["confusion"]
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity", "f1", "loss"):
        assert on_disk["final"][key] == pytest.approx(trained["final"][key])
    assert len(on_disk["rounds"]) == 10 and on_disk["rounds"][0]["round"] == 1
    assert (folder / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    raw = torch.load(folder / "model.pt", weights_only=True)
    assert raw["model"] == {"arch": "convnet", "num_classes": 2, "in_channels": 1, "image_size": 32,
                            "options": {"width": 8, "depth": 3, "pool_first": True}}
    assert raw["round"] == 10
    # the saved weights are the final model: re-evaluating them on the held-out images gives the same AUC
    from gradleak.data import load_dataset, split_by_patient

    ds = load_dataset({"source": "phantoms", "n": 320, "size": 32})
    ev, _ = split_by_patient(ds, 0.2, seed=0)
    b = ds.batch(ev)
    model = build("convnet", 2, 1, 32, options=raw["model"]["options"])
    m = evaluate(model, raw["state_dict"], b.images, b.labels)
    assert m["roc_auc"] == pytest.approx(trained["final"]["roc_auc"], abs=1e-9)
    assert load_model(folder / "model_r1.pt")["round"] == 1


def test_a_trained_model_is_the_victim_of_capture(trained, tmp_path):
    model_pt = Path(trained["folder"]) / "model.pt"
    obs_path = tmp_path / "obs.pt"
    p = gradleak("capture", "--data", "phantoms", "--batch-size", 2, "--model-state", model_pt, "--out", obs_path)
    assert "convnet from" in p.stdout
    obs = observation.load(obs_path)
    state = torch.load(model_pt, weights_only=True)["state_dict"]
    assert obs.model["options"] == {"width": 8, "depth": 3, "pool_first": True} and obs.model["image_size"] == 32
    assert all(torch.equal(obs.global_state[k], state[k]) for k in state)
    assert obs.meta["model_round"] == 10
    # the same through an experiment config (capture.model_state)
    from gradleak.experiment import config
    from gradleak.experiment.run import run_experiment

    cfg = config.from_dict({"output_dir": str(tmp_path / "exp"), "data": {"source": "phantoms", "size": 32, "n": 8},
                            "capture": {"arch": "convnet", "batch_size": 1, "model_state": str(model_pt)},
                            "attack": {"settings": {"iterations": 2, "restarts": 1}}})
    folder, _ = run_experiment(cfg, progress=False)
    seen = observation.load(folder / "observation.pt")
    assert all(torch.equal(seen.global_state[k], state[k]) for k in state)
    cfg["capture"]["arch"] = "lenet5"
    with pytest.raises(UserError, match="arch 'convnet'.*arch 'lenet5'"):
        run_experiment(cfg, progress=False)
    assert len(list((tmp_path / "exp").iterdir())) == 1  # the failed run left nothing


def test_model_files_that_do_not_fit_are_one_line_errors(trained, tmp_path):
    from gradleak.models.checkpoint import check_matches

    model_pt = Path(trained["folder"]) / "model.pt"
    out = tmp_path / "o.pt"
    assert_user_error(gradleak("capture", "--model-state", model_pt, "--arch", "lenet5", "--out", out, check=False),
                      "arch 'convnet'", "arch 'lenet5'")
    assert not out.exists()
    ckpt = load_model(model_pt)
    with pytest.raises(UserError, match="image_size 32, but the command line has image_size 16"):
        check_matches(ckpt, where="the command line", image_size=16)
    with pytest.raises(UserError, match="options"):
        check_matches(ckpt, where="the config", options={"width": 16})
    with pytest.raises(UserError, match="model file not found"):
        load_model(tmp_path / "none.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable model file"):
        load_model(junk)
    bad = tmp_path / "bad.pt"
    state = dict(ckpt["state_dict"])
    state["classifier.weight"] = torch.zeros(3, 3)
    save_model(bad, ckpt["model"], state)
    with pytest.raises(UserError, match=r"state_dict\['classifier.weight'\] has shape 3x3, convnet expects 2x32"):
        load_model(bad)
    del state["classifier.weight"]
    save_model(bad, ckpt["model"], state)
    with pytest.raises(UserError, match="lacks 'classifier.weight'"):
        load_model(bad)
    torch.save({"model": {"arch": "convnet"}, "state_dict": {}}, bad)
    with pytest.raises(UserError, match="lacks 'num_classes'"):
        load_model(bad)
    torch.save({"model": {**ckpt["model"], "arch": "lenet9"}, "state_dict": {}}, bad)
    with pytest.raises(UserError, match="unknown model arch 'lenet9'"):
        load_model(bad)


def test_utility_cli_with_eval_data_and_saved_rounds(tmp_path):
    cfg = tmp_path / "u.yaml"
    cfg.write_text(TINY.format(out=tmp_path / "exp"))
    folder = tmp_path / "run"
    p = gradleak("utility", cfg, "--set", "federation.rounds=2", "--eval-data", "phantoms:n=24,seed=9",
                 "--set", "obfuscation=['topk:keep=0.1']", "--save-rounds", "1", "--out", folder, "--quiet")
    assert "ROC AUC" in p.stdout and "best round" in p.stdout and str(folder) in p.stdout
    res = json.loads((folder / "utility.json").read_text())
    assert res["data"]["eval"]["split"] == "eval_data" and res["data"]["eval"]["num_images"] == 24
    assert res["data"]["train"]["num_images"] == 48  # with eval_data, every image of `data` trains
    assert res["config"]["federation"]["rounds"] == 2 and len(res["rounds"]) == 2
    assert (folder / "model_r1.pt").is_file() and (folder / "model.pt").is_file()
    assert res["threat_model"]["obfuscation"] == ["topk"] and res["obfuscation"][0]["keep"] == 0.1
    assert res["bits_per_update"] < 0.5 * res["dense_bits_per_update"]
    assert res["bits_per_round"] == pytest.approx(3 * res["bits_per_update"])


def test_utility_config_errors_are_one_line_and_leave_nothing(tmp_path):
    out = tmp_path / "exp"
    cfg = tmp_path / "u.yaml"
    cfg.write_text(TINY.format(out=out))
    # through the real command: exit 2, one line, nothing written
    assert_user_error(gradleak("utility", cfg, "--set", "federation.round=2", "--quiet", check=False),
                      "unknown key 'federation.round'", "did you mean 'federation.rounds'")
    assert_user_error(gradleak("utility", cfg, "--eval-data", "nosuch:x", "--quiet", check=False),
                      "unknown data source 'nosuch'")
    assert not out.exists() or not any(out.iterdir())
    cases = [
        ({"federation.rounds": "zero"}, "'federation.rounds' must be an integer"),
        ({"federation.clients_per_round": 2}, "clients_per_round"),
        ({"obfuscation": [{"name": "qsdg"}]}, "unknown obfuscation 'qsdg'"),
        ({"obfuscation": [3]}, "must be a mapping"),
        ({"obfuscation": [{"name": "gaussian", "clip": 1, "epsilon": 2, "rounds": 5}]}, "rounds=5.*rounds is 3"),
        ({"save_rounds": [9]}, r"save_rounds.*1\.\.3"),
        ({"holdout": 1.0}, "holdout"),
        ({"threads": 0}, "threads"),
        ({"evaluation.monitor": "auc"}, "evaluation.monitor"),
        ({"federation.engine": "ray"}, "federation.engine"),
        ({"model.options": 3}, "model.options"),
    ]
    for overrides, pattern in cases:
        with pytest.raises(UserError, match=pattern):
            utility.load(cfg, overrides=overrides)
    with pytest.raises(UserError, match="unknown model arch 'lenet7'"):
        utility.run_utility(utility.load(cfg, overrides={"model.arch": "lenet7"}), progress=False)
    with pytest.raises(UserError, match="do not fit convnet"):
        utility.run_utility(utility.load(cfg, overrides={"model.options": {"colour": 3}}), progress=False)
    assert not out.exists() or not any(out.iterdir())
    with pytest.raises(UserError, match="config file not found"):
        utility.load(tmp_path / "missing.yaml")


def test_the_utility_config_checks_the_federation_with_its_dataclass_defaults(tmp_path):
    import dataclasses

    from gradleak.experiment.config import parse_assignment
    from gradleak.federated.settings import Evaluation, Settings

    defaults = utility.from_dict({})
    assert defaults["federation"] == {**dataclasses.asdict(Settings()), "engine": None}
    assert defaults["evaluation"] == dataclasses.asdict(Evaluation())
    cfg = tmp_path / "u.yaml"
    cfg.write_text(TINY.format(out=tmp_path / "exp") + "eval_data: phantoms:n=8\nholdout: 0\n")
    checked = utility.load(cfg, overrides=dict(parse_assignment(t) for t in (
        "federation.local_lr=1e-3", "federation.server_momentum=.5", "save_rounds=[1, 3]")))
    assert checked["federation"]["local_lr"] == 0.001 and checked["federation"]["server_momentum"] == 0.5
    assert checked["save_rounds"] == [1, 3] and checked["holdout"] == 0  # no hold-out with eval_data
    assert utility.settings(checked).local_lr == 0.001
    for overrides, message in [
        ({"federation.local_lr": 0}, "u.yaml: 'federation.local_lr' must be > 0 for fedavg, got 0"),
        ({"federation.partition": "dirichlet", "federation.alpha": 0}, "'federation.alpha' must be > 0, got 0"),
        ({"federation.server_momentum": 1}, "'federation.server_momentum' must be < 1, got 1"),
        ({"evaluation.threshold": 1.5}, "'evaluation.threshold' must be < 1, got 1.5"),
        ({"eval_data": 3}, "'eval_data' must be a data spec (text or mapping), got 3"),
        ({"save_rounds": [0]}, "'save_rounds' must be a list of rounds in 1..3, got [0]"),
    ]:
        with pytest.raises(UserError) as e:
            utility.load(cfg, overrides=overrides)
        assert message in str(e.value) and str(e.value).startswith(str(cfg))


FLOWER_TINY = """
name: tiny-flower
threads: 1
output_dir: {out}
data: {{source: phantoms, n: 40, size: 16}}
model: {{arch: convnet, options: {{width: 4, depth: 2}}}}
federation: {{num_clients: 2, rounds: 2, local_lr: 0.05, local_batch_size: 8, engine: {engine}}}
obfuscation: [{{name: topk, keep: 0.2}}]
"""


def test_utility_cli_on_flowers_engine_matches_the_built_in_loop(tmp_path):
    pytest.importorskip("flwr")
    pytest.importorskip("ray")
    runs = {}
    for engine in ("flower", "local"):
        cfg = tmp_path / f"{engine}.yaml"
        cfg.write_text(FLOWER_TINY.format(out=tmp_path / "exp", engine=engine))
        gradleak("utility", cfg, "--out", tmp_path / engine, "--quiet")
        runs[engine] = json.loads((tmp_path / engine / "utility.json").read_text())
        assert runs[engine]["engine"] == {"name": engine, "note": None}
        assert f"engine: {engine}" in (tmp_path / engine / "log.txt").read_text()
    flower, local = runs["flower"], runs["local"]
    assert flower["rounds_run"] == 2 and [r["round"] for r in flower["rounds"]] == [1, 2]
    assert 0 <= flower["final"]["roc_auc"] <= 1 and flower["final"]["num_images"] > 0
    assert set(flower["final"]) >= {"roc_auc", "accuracy", "loss", "confusion"}
    assert flower["obfuscation"][0]["name"] == "topk" and flower["bits_per_update"] < flower["dense_bits_per_update"]
    # one loop, one thread on both sides, no random obfuscation: the same numbers
    for a, b in zip(flower["rounds"], local["rounds"]):
        assert (a["clients"], a["bits"], a["loss"], a["roc_auc"]) == (b["clients"], b["bits"], b["loss"], b["roc_auc"])
    assert (tmp_path / "flower" / "model.pt").is_file()


def test_a_diverged_client_stops_the_run_with_one_line_on_either_engine(tmp_path):
    """A client whose local training overflows would leave the model NaN and its accuracy meaningless: the run
    stops with the round, the client and the remedy, and writes nothing (Flower's node sends the reason back)."""
    import importlib.util

    flower = importlib.util.find_spec("flwr") is not None and importlib.util.find_spec("ray") is not None
    for engine in ("flower", "local") if flower else ("local",):  # the built-in loop needs no Flower
        cfg = tmp_path / f"{engine}.yaml"
        cfg.write_text(FLOWER_TINY.format(out=tmp_path / "exp", engine=engine))
        out = tmp_path / f"run-{engine}"
        p = gradleak("utility", cfg, "--set", "federation.local_lr=1e30", "--out", out, "--quiet", check=False)
        assert_user_error(p, "gradleak: error: round 1: client ", ": the client's update of '",
                          "' has NaN or Inf entries: its local training diverged (",
                          " steps of learning rate 1e+30: lower the local learning rate)")
        assert not out.exists() and (not (tmp_path / "exp").exists() or not any((tmp_path / "exp").iterdir()))


def test_engine_flower_without_flower_installed_is_a_one_line_error(tmp_path):
    cfg = tmp_path / "u.yaml"
    cfg.write_text(FLOWER_TINY.format(out=tmp_path / "exp", engine="flower"))
    # the command as it runs where Flower is not installed: the import system finds no flwr
    code = ("import sys; sys.modules['flwr'] = None; from gradleak.cli import main; "
            f"sys.exit(main(['utility', {str(cfg)!r}, '--quiet']))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert_user_error(p, "federation.engine is flower, but Flower is not installed", "pip install")
    assert not (tmp_path / "exp").exists() or not any((tmp_path / "exp").iterdir())
    cfg.write_text(FLOWER_TINY.format(out=tmp_path / "exp", engine="null"))
    code = code.replace("'--quiet'", "'--quiet', '--set', 'federation.rounds=1'")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    (run,) = (tmp_path / "exp").iterdir()
    res = json.loads((run / "utility.json").read_text())
    assert res["engine"]["name"] == "local" and "Flower is not installed" in res["engine"]["note"]
