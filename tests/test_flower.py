"""gradleak on Flower: the obfuscation mod, the server capture, utility runs on Flower's engine.

Two real Flower simulations (Ray) run once each for the module: a FedAvg federation of 2 hospitals x 2
rounds with the mod and the capture on, and a utility run on Flower's engine next to the built-in loop.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # no usage reports from the test suite
pytest.importorskip("flwr")
pytest.importorskip("ray")

from flwr.app import (ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, Metadata,  # noqa: E402
                      RecordDict)
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg  # noqa: E402
from flwr.simulation import run_simulation  # noqa: E402
from flwr.supercore.differential_privacy import compute_clip_model_update  # noqa: E402

from gradleak import obfuscation, observation  # noqa: E402
from gradleak.data import load_dataset  # noqa: E402
from gradleak.errors import UserError  # noqa: E402
from gradleak.federated import Protocol, client_update  # noqa: E402
from gradleak.federated.partition import partition_by_patient  # noqa: E402
from gradleak.federated.simulation import Evaluation, Settings, SimulationResult, simulate  # noqa: E402
from gradleak.flower import (CaptureStrategy, central_dp, choose_engine, noise_generator,  # noqa: E402
                             obfuscation_mod, observation_from_reply, train_reply)
from gradleak.flower import simulate as flower_simulate  # noqa: E402
from gradleak.flower.capture import NonFiniteReply  # noqa: E402
from gradleak.flower.records import read_info, reply, to_record, to_tensors  # noqa: E402
from gradleak.models import build  # noqa: E402

SIZE = 16
HEADER = {"arch": "lenet5", "num_classes": 2, "in_channels": 1, "image_size": SIZE}
PROTOCOL = Protocol("fedavg", local_steps=2, local_lr=0.1, local_batch_size=4)
SPECS = ["topk:keep=0.5", "qsgd:levels=16"]  # qsgd draws from the noise generator
SEED = 7


@pytest.fixture(scope="module")
def hospitals():
    """40 training phantoms of 10 patients split by patient among 2 hospitals, and 8 evaluation images."""
    ds = load_dataset(f"phantoms:n=48,size={SIZE}")
    x, y = ds.load(list(range(40))), torch.as_tensor(ds.labels[:40])
    part = partition_by_patient(ds.labels[:40], ds.patient_ids[:40], 2, seed=0)
    return x, y, part.clients, ds.load(list(range(40, 48))), torch.as_tensor(ds.labels[40:48])


def _model():
    return build("lenet5", 2, 1, SIZE, seed=0)


def _message(content, message_type, server_round=1):
    """A message as a ServerApp sends it (outside a run, so with its metadata written out)."""
    meta = Metadata(run_id=1, message_id="m", src_node_id=0, dst_node_id=11, reply_to_message_id="",
                    group_id=str(server_round), created_at=0.0, ttl=60.0, message_type=message_type)
    return Message(content, metadata=meta)


def _train_message(state, server_round=1):
    content = RecordDict({"arrays": to_record(state), "config": ConfigRecord({"server-round": server_round})})
    return _message(content, MessageType.TRAIN, server_round)


def _context(partition):
    return Context(run_id=1, node_id=11, node_config={"partition-id": partition}, state=RecordDict(), run_config={})


def _expected_update(state, images, labels):
    """What the client computes before its obfuscation (gradleak's one client code path)."""
    update, _ = client_update(_model(), state, images, labels, PROTOCOL)
    return update


# ------------------------------------------------------------------------------------------ the mod
def test_mod_output_is_obfuscation_apply_on_the_same_update_and_seed(hospitals):
    x, y, clients, _, _ = hospitals
    state = _model().state_dict()
    images, labels = x[clients[1]], y[clients[1]]
    mod = obfuscation_mod(SPECS, seed=SEED)
    out = mod(_train_message(state, 3), _context(1), lambda m, c: train_reply(m, _model(), images, labels, PROTOCOL))
    sent = to_tensors(out.content["arrays"])
    observed = PROTOCOL.observed(len(images))
    expected, records, bits = obfuscation.apply(SPECS, _expected_update(state, images, labels),
                                                noise_generator(SEED, 3, 1), obfuscation.Context.from_protocol(observed))
    for name, value in expected.items():
        assert torch.equal(sent[name], state[name] + value), name
    info = read_info(out.content)
    assert info["obfuscation"] == records and info["update_bits"] == bits
    assert info["protocol"] == observed.header() and (info["round"], info["client"]) == (3, 1)
    assert "labels" not in info  # FedAvg does not reveal labels
    # another round draws other noise, and so does a client with no seed (from the operating system)
    def sent_by(mod, server_round):
        out = mod(_train_message(state, server_round), _context(1),
                  lambda m, c: train_reply(m, _model(), images, labels, PROTOCOL))
        return to_tensors(out.content["arrays"])

    assert any(not torch.equal(sent_by(mod, 4)[n], sent[n]) for n in sent)
    unseeded = obfuscation_mod(SPECS)
    first, second = sent_by(unseeded, 3), sent_by(unseeded, 3)
    assert any(not torch.equal(first[n], second[n]) for n in sent)


def test_mod_passes_other_messages_and_reports_bad_specs():
    query = _message(RecordDict(), MessageType.QUERY)
    answer = Message(RecordDict({"x": ConfigRecord({"a": 1})}), reply_to=query)
    assert obfuscation_mod(SPECS)(query, _context(0), lambda m, c: answer) is answer
    with pytest.raises(UserError, match="qsgdd"):
        obfuscation_mod(["qsgdd:levels=4"])


def test_central_dp_observation_is_the_clipped_unnoised_update(hospitals):
    x, y, clients, _, _ = hospitals
    state = _model().state_dict()
    msg = _train_message(state)
    reply = train_reply(msg, _model(), x[clients[0]], y[clients[0]], PROTOCOL)
    dp = central_dp(DifferentialPrivacyServerSideFixedClipping(FedAvg(), noise_multiplier=1.0, clipping_norm=0.05,
                                                               num_sampled_clients=2))
    obs = observation_from_reply(reply, state, model=HEADER, dp=dp)
    flwr_clipped = [a.numpy().copy() for a in reply.content["arrays"].values()]
    compute_clip_model_update(flwr_clipped, [v.numpy() for v in state.values()], 0.05)
    for (name, value), after in zip(state.items(), flwr_clipped):  # Flower's own clipping of the reply
        assert torch.allclose(obs.update[name], torch.from_numpy(after) - value, atol=1e-7), name
    record = obs.obfuscation[-1]
    assert record["name"] == "gaussian" and record["clip"] == 0.05 and record["sigma"] == 0.0
    assert record["norm_before_clip"] > 0.05  # it was clipped
    assert "server" in record["applied_by"] and dp["aggregate_noise_std"] == pytest.approx(0.025)
    raw = observation_from_reply(reply, state, model=HEADER, dp=dp, unclipped=True)
    assert raw.obfuscation == [] and float(sum(v.norm() ** 2 for v in raw.update.values())) ** 0.5 > 0.05
    assert "without noise" in dp["server_sees"]
    wrapper = DifferentialPrivacyServerSideFixedClipping(FedAvg(), 1.0, 0.05, 2)
    assert "as the client sent it" in central_dp(wrapper, unclipped=True)["server_sees"]


def test_capture_needs_a_protocol_and_refuses_weights_read_as_a_gradient(hospitals):
    x, y, clients, _, _ = hospitals
    state = _model().state_dict()
    msg = _train_message(state)
    reply = train_reply(msg, _model(), x[clients[0]], y[clients[0]], PROTOCOL)
    reply.content.config_records.pop("gradleak")  # a reply from a client without gradleak's train function
    with pytest.raises(UserError, match="protocol"):
        observation_from_reply(reply, state, model=HEADER)
    obs = observation_from_reply(reply, state, model=HEADER, protocol=PROTOCOL)
    assert obs.num_images == len(clients[0])
    with pytest.raises(UserError, match="weight delta"):
        observation_from_reply(reply, state, model=HEADER, protocol=Protocol("fedsgd"))


def test_a_diverged_client_sends_nothing_and_the_capture_goes_on(hospitals, tmp_path):
    x, y, clients, _, _ = hospitals
    state = _model().state_dict()
    msg = _train_message(state)
    images, labels = x[clients[0]], y[clients[0]]
    with pytest.raises(UserError, match=r"NaN or Inf entries: its local training diverged \(2 steps of learning "
                                        r"rate 1e\+30: lower the local learning rate\)"):
        train_reply(msg, _model(), images, labels, Protocol("fedavg", local_steps=2, local_lr=1e30))
    poisoned = {k: v.clone() for k, v in state.items()}
    poisoned["fc1.weight"][0, 0] = float("nan")
    with pytest.raises(UserError, match="the model the server sent has NaN or Inf entries in 'fc1.weight'"):
        train_reply(_train_message(poisoned), _model(), images, labels, PROTOCOL)
    # a client without gradleak's train function can still send one: the server writes the others and lists it
    sent_back = train_reply(msg, _model(), images, labels, PROTOCOL)
    good = reply(msg, to_tensors(sent_back.content["arrays"]), len(images), {**read_info(sent_back.content),
                                                                             "client": 0})
    after = {k: v.clone() for k, v in to_tensors(sent_back.content["arrays"]).items()}
    after["conv2.weight"][0, 0, 0, 0] = float("inf")
    bad = reply(msg, after, len(images), {**read_info(sent_back.content), "client": 1})
    with pytest.raises(NonFiniteReply, match="'conv2.weight' has NaN or Inf entries"):
        observation_from_reply(bad, state, model=HEADER)
    # and gradleak's own client, which refuses to send, reaches the server as an error reply: listed too
    error = Message(error=Error(code=0, reason="the client's update of 'fc1.weight' has NaN or Inf entries"),
                    reply_to=msg)
    strategy = CaptureStrategy(FedAvg(), tmp_path / "captured", model=HEADER)
    strategy.sent[1] = state
    strategy.aggregate_train(1, [good, bad, error])
    index = json.loads((tmp_path / "captured" / "captures.json").read_text())
    assert [(e["client"], "file" in e, "refused" in e) for e in index] == [(0, True, False), (1, False, True),
                                                                           (11, False, True)]
    assert "diverged" in index[1]["refused"] and not (tmp_path / "captured" / "round001" / "client1.pt").exists()
    assert index[2]["refused"] == ("the client answered with an error: the client's update of 'fc1.weight' has NaN "
                                   "or Inf entries") and index[2]["node_id"] == 11
    with pytest.raises(NonFiniteReply, match="the model the server sent has NaN or Inf entries in 'fc1.weight'"):
        observation_from_reply(good, poisoned, model=HEADER)
    obs = observation.load(tmp_path / "captured" / index[0]["file"])
    assert torch.allclose(obs.update["fc1.weight"], _expected_update(state, images, labels)["fc1.weight"], atol=1e-7)


def test_records_keep_shapes_dtypes_and_order():
    state = _bn_model().state_dict()  # BatchNorm's num_batches_tracked is a 0-d int64 tensor
    back = to_tensors(to_record(state))
    assert list(back) == list(state)
    for name, value in state.items():
        assert back[name].shape == value.shape and back[name].dtype == value.dtype, name
        assert torch.equal(back[name], value), name


def test_engine_choice():
    assert choose_engine("local") == ("local", None)
    assert choose_engine(None) == ("flower", None)  # Flower is installed here
    with pytest.raises(UserError, match="federation.engine"):
        choose_engine("spark")


# ------------------------------------------------------------------------------------------ a real federation
class RecordingFedAvg(FedAvg):
    """Flower's FedAvg that also keeps what it sent and received, to compare the captures with."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.sent, self.received = {}, {}

    def configure_train(self, server_round, arrays, config, grid):
        self.sent[server_round] = to_tensors(arrays)
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        replies = list(replies)
        self.received[server_round] = {read_info(r.content)["client"]: to_tensors(r.content["arrays"])
                                       for r in replies}
        return super().aggregate_train(server_round, replies)


@pytest.fixture(scope="module")
def federation(hospitals, tmp_path_factory):
    """2 hospitals x 2 rounds of FedAvg on Flower's simulation engine, the mod and the capture on."""
    x, y, clients, _, _ = hospitals
    folder = tmp_path_factory.mktemp("flower") / "captured"
    client = ClientApp(mods=[obfuscation_mod(SPECS, seed=SEED)])

    @client.train()
    def train(msg, context):
        k = int(context.node_config["partition-id"])
        return train_reply(msg, _model(), x[clients[k]], y[clients[k]], PROTOCOL)

    inner = RecordingFedAvg(fraction_evaluate=0.0, min_train_nodes=2, min_available_nodes=2)
    strategy = CaptureStrategy(inner, folder, model=HEADER)
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        strategy.start(grid, ArrayRecord(_model().state_dict()), num_rounds=2)

    run_simulation(server, client, num_supernodes=2, backend_config={"client_resources": {"num_cpus": 1}})
    return folder, inner


def test_captures_validate_and_hold_what_each_client_sent(federation, hospitals):
    folder, inner = federation
    x, y, clients, _, _ = hospitals
    index = json.loads((folder / "captures.json").read_text())
    assert sorted((e["round"], e["client"]) for e in index) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    for entry in index:
        r, k = entry["round"], entry["client"]
        obs = observation.load(folder / entry["file"])
        sent = inner.sent[r]
        assert all(torch.equal(obs.global_state[n], sent[n]) for n in sent)
        received = inner.received[r][k]
        for name, value in obs.update.items():  # exactly what reached the server, as a weight delta
            assert torch.equal(value, received[name] - sent[name]), name
        assert obs.protocol.header() == PROTOCOL.observed(len(clients[k])).header()
        assert obs.labels is None and obs.meta["round"] == r and obs.meta["client"] == k
        # and what the client's mod made of gradleak's own update: obfuscation.apply with the same seed
        expected, records, _ = obfuscation.apply(
            SPECS, _expected_update(sent, x[clients[k]], y[clients[k]]), noise_generator(SEED, r, k),
            obfuscation.Context.from_protocol(obs.protocol))
        assert [rec["name"] for rec in obs.obfuscation] == ["topk", "qsgd"]
        for name, value in expected.items():
            assert torch.allclose(obs.update[name], value, atol=1e-6), name


def test_attack_runs_on_a_captured_update(federation, tmp_path):
    folder, _ = federation
    out = tmp_path / "attack"
    proc = subprocess.run([sys.executable, "-m", "gradleak.cli", "attack", "--observation",
                           str(folder / "round002" / "client1.pt"), "--out", str(out), "--attack", "ig",
                           "--set", "iterations=5", "--restarts", "1", "--quiet"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert any(out.iterdir())


# ------------------------------------------------------------------------------------------ utility engine
def _bn_model():
    return build("convnet", 2, 1, SIZE, seed=0, options={"width": 4, "depth": 2})  # BatchNorm: buffers travel


def test_flower_utility_run_matches_the_built_in_loop(hospitals):
    x, y, clients, xe, ye = hospitals
    settings = Settings(num_clients=2, rounds=2, algorithm="fedsgd", local_batch_size=6, server_lr=0.5,
                        server_momentum=0.5, class_balanced=True, sends_buffers=True)
    kw = dict(evaluation=Evaluation(), obfuscations=[{"name": "topk", "keep": 0.3}], seed=3)
    seen, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)  # as each Flower node runs: the same float sums, so top-k keeps the same entries
    try:
        local = simulate(_bn_model(), x, y, clients, xe, ye, settings, **kw)
    finally:
        torch.set_num_threads(threads)
    flower = flower_simulate(_bn_model(), x, y, clients, xe, ye, settings,
                             on_round=lambda r, s, rep: seen.append((r, choose_engine(None))), **kw)
    assert isinstance(flower, SimulationResult) and [r for r, _ in seen] == [1, 2]
    name, note = seen[0][1]  # while Flower's engine runs, Ray runs in this process: a nested run is local
    assert name == "local" and "Ray already runs" in note
    assert [set(r) for r in flower.rounds] == [set(r) for r in local.rounds]
    for a, b in zip(local.rounds, flower.rounds):  # one loop; same clients, data order, obfuscation: same bits
        assert (a["clients"], a["bits"], a["epsilon"], a["loss"]) == (b["clients"], b["bits"], b["epsilon"], b["loss"])
    for name, value in local.final_state.items():
        assert torch.equal(value, flower.final_state[name]), name
    assert (flower.best_round, flower.stopped_early, flower.bits_per_update) == \
        (local.best_round, local.stopped_early, local.bits_per_update)
    assert flower.obfuscation == local.obfuscation
