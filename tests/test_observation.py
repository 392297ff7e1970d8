import pytest
import torch

from gradleak import observation
from gradleak.errors import UserError
from gradleak.federated import ObservedProtocol, Protocol

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


def test_the_protocol_is_typed_in_memory_and_a_dict_only_on_disk(tmp_path):
    obs, _ = tiny_observation(n=4, protocol=Protocol("fedavg", local_steps=2, local_lr=0.1, local_batch_size=2))
    p = obs.protocol
    assert isinstance(p, ObservedProtocol) and isinstance(p, Protocol)
    assert (p.num_images, p.images_per_client, p.update_is, p.local_batch_size) == (4, 4, "weight_delta", 2)
    assert p.client() == Protocol("fedavg", local_steps=2, local_lr=0.1, local_batch_size=2)
    raw = obs.to_dict()
    assert raw["protocol"] == p.header() and isinstance(raw["protocol"], dict)
    assert not hasattr(p, "get") and not hasattr(p, "__getitem__")  # attributes only; a dict only on disk
    # keys another tool wrote are kept through a load and a save
    raw["protocol"]["round"] = 12
    torch.save(raw, tmp_path / "foreign.pt")
    back = observation.load(tmp_path / "foreign.pt")
    assert back.protocol.other == {"round": 12} and back.protocol.client() == p.client()
    observation.save(back, tmp_path / "again.pt")
    assert torch.load(tmp_path / "again.pt", weights_only=True)["protocol"] == raw["protocol"]


LIMIT_CASES = [
    (lambda r: r["model"].update(image_size=100_000), "model.image_size must be an integer from 1 to 4096"),
    (lambda r: r["model"].update(in_channels=10_000), "model.in_channels must be an integer from 1 to 64"),
    (lambda r: r["model"].update(num_classes=10 ** 9), "model.num_classes must be an integer from 1 to 100000"),
    (lambda r: r["model"].update(image_size=16.0), "model.image_size must be an integer"),
    (lambda r: r["model"].update(options={"depth": 10 ** 6}), "model.options.depth must be"),
    (lambda r: r["protocol"].update(num_images=10 ** 7), "protocol.num_images must be an integer from 1 to 100000"),
    (lambda r: r["model"].update(image_size=4096, in_channels=64), "more than the 268435456 an attack may hold"),
    (lambda r: r["protocol"].update(local_steps="3"), "protocol.local_steps must be a positive integer"),
    (lambda r: r["protocol"].update(algorithm="fedavg", update_is="weight_delta"), "fedavg needs local_lr > 0"),
]


@pytest.mark.parametrize("mutate,message", LIMIT_CASES)
def test_absurd_headers_are_refused_before_any_model_is_built(tmp_path, mutate, message):
    path = _corrupt(tmp_path, mutate)
    with pytest.raises(UserError) as e:
        observation.load(path)
    assert message in str(e.value) and str(path) in str(e.value) and "\n" not in str(e.value)
