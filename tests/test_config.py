import math
from importlib import resources

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from gradleak.attacks import TYPES, names, preset, resolve_settings, settings_model
from gradleak.errors import UserError
from gradleak.experiment import config
from gradleak.experiment.spec import spec_from_dict
from gradleak.validation import load_yaml, parse_value


def test_defaults_fill_a_minimal_config(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ncapture:\n  batch_size: 2\n")
    cfg = config.load(p)
    assert cfg["name"] == "x" and cfg["capture"]["batch_size"] == 2
    assert cfg["capture"]["arch"] == "lenet5"
    assert cfg["capture"]["protocol"]["algorithm"] == "fedsgd"
    assert cfg["attack"]["name"] == "auto"


@pytest.mark.parametrize("text,message", [
    ("captur:\n  arch: lenet5\n", "unknown key 'captur' (did you mean 'capture'?)"),
    ("capture:\n  batchsize: 2\n", "unknown key 'capture.batchsize' (did you mean 'capture.batch_size'?)"),
    ("capture:\n  protocol:\n    local_step: 2\n", "did you mean 'capture.protocol.local_steps'?"),
    ("capture:\n  batch_size: two\n", "'capture.batch_size' must be an integer"),
    ("capture:\n  labels_known: 1\n", "'capture.labels_known' must be true/false"),
    ("seed: [1\n", "not valid YAML"),
    ("attack: 3\n", "'attack' must be a mapping"),
])
def test_config_errors_name_the_key(tmp_path, text, message):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(UserError) as e:
        config.load(p)
    assert message in str(e.value) and str(p) in str(e.value)


def test_overrides_by_dotted_key(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("{}\n")
    cfg = config.load(p, overrides={"attack.settings.iterations": 7, "capture.arch": "lenet_zhu"})
    assert cfg["attack"]["settings"]["iterations"] == 7 and cfg["capture"]["arch"] == "lenet_zhu"
    with pytest.raises(UserError, match="unknown key 'capture.arc'"):
        config.load(p, overrides={"capture.arc": "x"})


def test_attack_presets_inherit_and_reject_unknown_settings():
    s = preset("ig")
    assert s["restarts"] >= 1 and "tv_weight" in s and s["iterations"] > 0  # from default.yaml + own preset
    assert resolve_settings("inverting_gradients", {"iterations": 5})["iterations"] == 5
    with pytest.raises(UserError, match="did you mean 'tv_weight'"):
        resolve_settings("ig", {"tv_weigth": 1})
    with pytest.raises(UserError, match="unknown attack"):
        resolve_settings("nope")
    with pytest.raises(UserError, match="iterations, a time budget"):
        resolve_settings("ig", {"iterations": None})


# ------------------------------------------------------------------------------- YAML 1.2 and --set
@pytest.mark.parametrize("text,value", [
    ("1e-3", 0.001), ("1E3", 1000.0), (".5", 0.5), ("-2", -2), ("+5", 5), ("1.", 1.0), ("-2.5e+3", -2500.0),
    ("010", 10), ("0o17", 15), ("0x10", 16), ("true", True), ("False", False), ("null", None), ("~", None),
    ("", None), ("yes", "yes"), ("no", "no"), ("on", "on"), ("off", "off"), ("inf", "inf"),
    ("1_000", "1_000"), ("2024-01-01", "2024-01-01"), ("[1, 1e-3, yes]", [1, 0.001, "yes"]),
    ("{name: qsgd, levels: 16}", {"name": "qsgd", "levels": 16}), ("a: [", "a: ["),
])
def test_values_are_read_as_yaml_1_2(text, value):
    got = parse_value(text)
    assert got == value and type(got) is type(value)


def test_yaml_1_2_spells_infinity_and_nan_with_a_dot():
    assert parse_value(".inf") == math.inf and parse_value("-.inf") == -math.inf
    assert math.isnan(parse_value(".nan"))


@given(st.floats(allow_nan=False, allow_infinity=False))
def test_a_float_written_by_repr_reads_back_the_same(x):
    key, value = config.parse_assignment(f"a.b={x!r}")
    assert key == "a.b" and type(value) is float and value == x and math.copysign(1, value) == math.copysign(1, x)


@given(st.integers())
def test_an_integer_reads_back_the_same(n):
    assert config.parse_assignment(f"seed={n}") == ("seed", n)


def test_assignments_and_dotted_keys():
    assert config.parse_assignment(" federation.local_lr = 1e-3") == ("federation.local_lr", 0.001)
    assert config.parse_assignment("obfuscation=['topk:keep=0.1']") == ("obfuscation", ["topk:keep=0.1"])
    assert config.parse_assignment("prior=") == ("prior", None)
    for bad in ("nokey", "=3"):
        with pytest.raises(UserError, match="expected KEY=VALUE"):
            config.parse_assignment(bad)
    cfg = {"capture": {"options": None}, "seed": 1}
    config.set_dotted(cfg, "capture.options.width", 8)
    config.set_dotted(cfg, "attack.settings.lr", 0.1)
    assert cfg == {"capture": {"options": {"width": 8}}, "seed": 1, "attack": {"settings": {"lr": 0.1}}}
    with pytest.raises(UserError, match="cannot set 'seed.x': 'seed' is not a section"):
        config.set_dotted(cfg, "seed.x", 2, source="c.yaml")


def test_config_files_and_overrides_read_numbers_as_yaml_1_2(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("capture:\n  protocol: {algorithm: fedavg, local_lr: 1e-3, local_steps: 2}\n")
    cfg = config.load(p, overrides=dict([config.parse_assignment("attack.settings.lr=5E-2"),
                                         config.parse_assignment("capture.protocol.local_lr=2e-3")]))
    assert cfg["capture"]["protocol"]["local_lr"] == 0.002 and cfg["attack"]["settings"]["lr"] == 0.05
    p.write_text("capture:\n  labels_known: yes\n")
    with pytest.raises(UserError, match="'capture.labels_known' must be true/false, got 'yes'"):
        config.load(p)


def test_a_dumped_config_reads_back_the_same_under_yaml_1_1_and_1_2():
    cfg = config.from_dict({"name": "1e-3", "output_dir": "yes", "capture": {"arch": "010"},
                            "attack": {"settings": {"lr": 1e-5, "time_budget": 30.0}}})
    text = config.dump(cfg)
    assert load_yaml(text) == cfg and yaml.safe_load(text) == cfg


# ------------------------------------------------------------------------------------ config models
@pytest.mark.parametrize("user,message", [
    ({"capture": {"protocol": {"algorithm": "fedavgg"}}},
     "'capture.protocol.algorithm' must be one of fedsgd, fedavg, got 'fedavgg' (did you mean 'fedavg'?)"),
    ({"capture": {"protocol": {"algorithm": "fedavg"}}}, "'capture.protocol.local_lr' must be > 0 for fedavg"),
    ({"capture": {"batch_size": 0}}, "'capture.batch_size' must be >= 1, got 0"),
    ({"capture": {"std": [0.5, 0]}}, "'capture.std[1]' must be > 0, got 0"),
    ({"capture": {"indices": [0, -1]}}, "'capture.indices[1]' must be >= 0, got -1"),
    ({"capture": {"obfuscation": "qsgd"}}, "'capture.obfuscation' must be a list, got 'qsgd'"),
    ({"seed": "3"}, "'seed' must be an integer, got '3'"),
])
def test_config_values_out_of_type_or_range_name_the_place_and_the_file(user, message):
    with pytest.raises(UserError) as e:
        config.from_dict(user, source="exp.yaml")
    assert str(e.value).startswith("exp.yaml: ") and message in str(e.value)


def test_empty_sections_take_their_defaults_and_data_keeps_its_defaults(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("capture:\nattack:\ndata: {n: 8}\n")
    cfg = config.load(p)
    assert cfg["capture"]["batch_size"] == 4 and cfg["attack"]["name"] == "auto"
    assert cfg["data"] == {"source": "phantoms", "size": 64, "n": 8}


# ---------------------------------------------------------------------------------- attack settings
@pytest.mark.parametrize("overrides,message", [
    ({"restarts": "abc"}, "attack 'inverting_gradients': restarts must be an integer, got 'abc'"),
    ({"restarts": 0}, "attack 'inverting_gradients': restarts must be >= 1, got 0"),
    ({"lr": -1}, "attack 'inverting_gradients': lr must be > 0, got -1"),
    ({"time_budget": 0}, "time_budget must be > 0, got 0"),
    ({"attacker_knows_obfuscation": 1}, "attacker_knows_obfuscation must be true/false, got 1"),
    ({"objective": "cosin"}, "objective must be one of cosine, l2, got 'cosin' (did you mean 'cosine'?)"),
    ({"leak_share": 0.5}, "attack 'inverting_gradients' has no setting 'leak_share'"),
])
def test_attack_settings_are_checked_against_the_preset(overrides, message):
    with pytest.raises(UserError) as e:
        resolve_settings("ig", overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_auto_settings_and_numbers_given_as_text():
    with pytest.raises(UserError, match="leak_share must be <= 1, got 2"):
        resolve_settings("auto", {"leak_share": 2})
    with pytest.raises(UserError, match="fallback_batch must be one of"):
        resolve_settings("auto", {"fallback_batch": "auto"})
    s = resolve_settings("rog", {"lr": "1e-3", "restarts": "2", "time_budget": 5})
    assert s["lr"] == 0.001 and s["restarts"] == 2 and s["time_budget"] == 5.0


def test_presets_are_the_only_defaults_and_every_setting_is_typed():
    from gradleak.attacks import auto, dlg, engine, inverting, rog

    assert not hasattr(engine, "COMMON")
    assert not any(hasattr(m, "DEFAULTS") for m in (auto, dlg, inverting, rog))
    default = set(load_yaml((resources.files("gradleak") / "configs" / "attacks" / "default.yaml").read_text()))
    for name in names():
        keys = set(settings_model(name).model_fields)
        assert keys <= set(TYPES) and default <= keys, name  # every attack has every shared setting
    assert set(engine.CHOICES) <= default


def test_cli_attack_settings_errors_are_one_line(tmp_path):
    from test_cli import assert_user_error, gradleak

    obs = tmp_path / "obs.pt"
    gradleak("capture", "--size", 16, "--batch-size", 1, "--arch", "lenet_zhu", "--out", obs)
    for setting, fragment in [("restarts=abc", "restarts must be an integer, got 'abc'"),
                              ("restarts=0", "restarts must be >= 1, got 0"), ("lr=-1", "lr must be > 0, got -1"),
                              ("tv_weigth=1", "did you mean 'tv_weight'")]:
        out = tmp_path / setting.split("=")[0]
        assert_user_error(gradleak("attack", "--observation", obs, "--attack", "ig", "--set", setting,
                                   "--out", out, check=False), fragment)
        assert not out.exists()


def test_cli_run_names_the_file_and_the_key(tmp_path):
    from test_cli import assert_user_error, gradleak

    p = tmp_path / "bad.yaml"
    p.write_text("capture:\n  protocol: {algorithm: fedavg, local_lr: -1e-3}\n")
    assert_user_error(gradleak("run", p, check=False), str(p), "'capture.protocol.local_lr' must be >= 0, got -0.001")
    p.write_text("capture: {batch_size: 2}\n")
    assert_user_error(gradleak("run", p, "--set", "capture.protocl.local_steps=2", check=False),
                      "unknown key 'capture.protocl' (did you mean 'capture.protocol'?)")


# -------------------------------------------------------------------------------------- sweep specs
def test_a_sweep_base_is_completed_by_its_grid():
    spec = spec_from_dict({"base": {"capture": {"protocol": {"algorithm": "fedavg"}}},
                           "grid": {"capture.protocol.local_lr": [0.1, 0.01]}}, source="s.yaml")
    assert spec["grid"]["capture.protocol.local_lr"] == [0.1, 0.01] and "output_dir" not in spec["base"]
    spec = spec_from_dict({"grid": {"capture.options": [{"width": 4}], "attack.settings.lr": [1e-3]}},
                          overrides=dict([config.parse_assignment("reid.gallery_size=0x100")]))
    assert spec["reid"]["gallery_size"] == 256 and spec["grid"]["capture.options"] == [{"width": 4}]
    for user, message in [({"grid": {"seed.x": [1]}}, "unknown grid key 'seed.x'"),
                          ({"grid": {"capture.options.width": [1]}}, "unknown grid key 'capture.options.width'"),
                          ({"reid": {"embedding": "pca"}}, "'reid.embedding' must be auto, autoencoder, none or "
                                                           "classifier:PATH, got 'pca'"),
                          ({"utility": {"seeds": 0}}, "'utility.seeds' must be >= 1, got 0"),
                          ({"reid": {"gallery_size": 1e2}}, "'reid.gallery_size' must be an integer, got 100.0"),
                          ({"gpus_per_cell": -1}, "'gpus_per_cell' must be >= 0, got -1")]:
        with pytest.raises(UserError) as e:
            spec_from_dict(user, source="s.yaml")
        assert str(e.value) == f"s.yaml: {message}"


def test_a_config_attacking_a_model_file_reads_its_data_at_the_model_s_size(tmp_path):
    from gradleak.models import build
    from gradleak.models.checkpoint import save_model

    model = build("lenet5", 2, 1, 32)
    path = save_model(tmp_path / "model.pt", {"arch": "lenet5", "num_classes": 2, "in_channels": 1, "image_size": 32},
                      model.state_dict(), round=3)
    cfg = config.from_dict({"capture": {"model_state": str(path)}})
    assert cfg["data"]["size"] == 32  # as `gradleak capture --model-state` does
    assert config.from_dict({"capture": {"model_state": str(path)}, "data": {"size": 48}})["data"]["size"] == 48
    assert config.from_dict({"capture": {"model_state": str(path)}}, overrides={"data.size": 40})["data"]["size"] == 40
    assert config.from_dict({})["data"]["size"] == 64
    with pytest.raises(UserError, match="capture.model_state: model file not found"):
        config.from_dict({"capture": {"model_state": str(tmp_path / "missing.pt")}}, source="exp.yaml")
