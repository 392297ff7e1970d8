import pytest
import torch

from gradleak import observation
from gradleak.errors import UserError
from gradleak.federated import Protocol

from factories import tiny_observation


def test_round_trip_is_exact_and_weights_only(tmp_path):
    obs, _ = tiny_observation("convnet", n=3, protocol=Protocol(sends_buffers=True))
    path = observation.save(obs, tmp_path / "obs.pt")
    raw = torch.load(path, weights_only=True)  # loadable without unpickling code
    assert raw["format"] == "gradleak-observation/1"
    back = observation.load(path)
    assert back.model == obs.model and back.protocol == obs.protocol and back.data == obs.data
    for k in obs.update:
        assert torch.equal(back.update[k], obs.update[k])
    for k in obs.global_state:
        assert torch.equal(back.global_state[k], obs.global_state[k])
    assert torch.equal(back.labels, obs.labels)
    assert back.buffers is not None and set(back.buffers) <= set(obs.global_state)
    assert [t.name for t in tmp_path.iterdir()] == ["obs.pt"]  # no temporary left over


def _corrupt(tmp_path, mutate):
    obs, _ = tiny_observation()
    raw = obs.to_dict()
    mutate(raw)
    path = tmp_path / "bad.pt"
    torch.save(raw, path)
    return path


CASES = [
    (lambda r: r.update(format="something/2"), "format tag"),
    (lambda r: r.pop("protocol"), "missing key 'protocol'"),
    (lambda r: r["model"].pop("image_size"), "missing key 'model.image_size'"),
    (lambda r: r["model"].update(arch="lenet9"), "unknown model arch"),
    (lambda r: r["update"].pop("classifier.weight"), "update lacks parameter 'classifier.weight'"),
    (lambda r: r["update"].update({"extra.weight": torch.zeros(1)}), "not a parameter"),
    (lambda r: r["update"].update({"classifier.bias": torch.zeros(3)}), "has shape (3)"),
    (lambda r: r["global_state"].pop("body.0.weight"), "global_state lacks 'body.0.weight'"),
    (lambda r: r["global_state"].update({"body.0.weight": torch.zeros(1, 1, 5, 5)}), "global_state['body.0.weight'] has shape"),
    (lambda r: r["update"]["classifier.weight"].view(-1).__setitem__(0, float("nan")), "NaN or Inf"),
    (lambda r: r["update"]["classifier.weight"].view(-1).__setitem__(0, float("inf")), "NaN or Inf"),
    (lambda r: r.update(labels=torch.tensor([0, 1, 1])), "labels has 3 entries"),
    (lambda r: r.update(labels=torch.tensor([0, 5])), "labels must lie in"),
    (lambda r: r["protocol"].update(algorithm="fedprox"), "protocol.algorithm"),
    (lambda r: r["protocol"].update(update_is="weight_delta"), "update_is"),
    (lambda r: r.update(obfuscation=[{"levels": 4}]), "'obfuscation' must be a list of dicts"),
]


@pytest.mark.parametrize("mutate,message", CASES)
def test_every_validation_error_is_one_clear_user_error(tmp_path, mutate, message):
    path = _corrupt(tmp_path, mutate)
    with pytest.raises(UserError) as e:
        observation.load(path)
    assert message in str(e.value)
    assert str(path) in str(e.value)
    assert "\n" not in str(e.value)


def test_not_an_observation_file(tmp_path):
    p = tmp_path / "junk.pt"
    p.write_bytes(b"this is not a torch file")
    with pytest.raises(UserError, match="not a readable observation file"):
        observation.load(p)
    with pytest.raises(UserError, match="not found"):
        observation.load(tmp_path / "missing.pt")
    # a pickle with arbitrary objects is refused by weights_only loading
    torch.save({"format": "gradleak-observation/1", "x": object}, p)
    with pytest.raises(UserError):
        observation.load(p)
