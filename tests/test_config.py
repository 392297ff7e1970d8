import pytest

from gradleak.attacks import preset, resolve_settings
from gradleak.errors import UserError
from gradleak.experiment import config


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
