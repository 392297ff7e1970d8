"""Observations written by other tools: obfuscation records with only the name and the parameters a
deployment knows, without the values gradleak's own records carry.

The attack derives what it can from each obfuscation's declaration, treats a step it cannot read as
unknown (the plain objective for that step, said in the threat model), and refuses an unknown name in
one line; it never fails with a traceback.
"""

import copy
import json

import pytest
import torch
from factories import tiny_observation
from test_cli import assert_user_error, gradleak

from gradleak import observation
from gradleak import obfuscation as ob
from gradleak.attacks import preset, run_attack
from gradleak.attacks.aware import for_observation
from gradleak.attacks.simulate import Simulator
from gradleak.errors import UserError
from gradleak.federated import Protocol
from gradleak.obfuscation import registry
from gradleak.obfuscation.params import Number, Params, PerTensor, ServerValues

S = preset("ig")  # the aware objectives' settings, as an attack resolves them

#: What a deployment knows of each built-in obfuscation: its name and the parameters it was given.
MINIMAL = {
    "none": {}, "qsgd": {"levels": 4}, "uniform": {"bits": 4}, "fp16": {}, "bf16": {}, "sign": {},
    "topk": {"keep": 0.1}, "randk": {"keep": 0.2}, "prune": {"p": 80},
    "gaussian": {"clip": 1.0, "noise_multiplier": 0.01}, "laplace": {"scale": 0.001},
    "relative_gaussian": {"sigma0": 0.1}, "snr_gaussian": {"snr_db": 10},
}
QUICK = {"iterations": 2, "restarts": 1}


def with_records(obs, records):
    """The same observation with other obfuscation records (as another tool would have written them)."""
    other = copy.copy(obs)
    other.obfuscation = [dict(r) for r in records]
    return other


def candidate(target, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.3 * v.abs().mean() * torch.randn(v.shape, generator=g) for k, v in target.items()}


def test_every_builtin_obfuscation_has_a_minimal_record_here():
    assert set(MINIMAL) == set(ob.names())


@pytest.mark.parametrize("name", sorted(MINIMAL))
def test_a_minimal_record_is_attacked_as_gradleaks_own(name):
    spec = {"name": name, **MINIMAL[name]}
    obs, _ = tiny_observation("lenet_zhu", n=2, obfuscations=[spec], obfuscation_seed=0)
    minimal = with_records(obs, [spec])
    target = Simulator(obs).target
    own, derived = for_observation(obs, target, "cosine", True, S), for_observation(minimal, target, "cosine", True, S)
    cand = candidate(target)
    if name == "relative_gaussian":  # its std depends on the update before the noise: not derivable
        assert own.name.startswith("snr-weighted cosine")
        assert derived.name.startswith("cosine; obfuscation step 1 (relative_gaussian) treated as unknown: its "
                                       "noise std is sigma0 times a percentile of the update before the noise")
        assert derived.info["treated_as_unknown"] and derived(cand).item() == pytest.approx(
            for_observation(obs, target, "cosine", False, S)(cand).item())
    elif name == "snr_gaussian":  # its std is estimated from the received update
        assert derived.name == own.name
        assert derived(cand).item() == pytest.approx(own(cand).item(), rel=0.02)
    else:  # derived exactly: the same objective, the same numbers
        assert derived.name == own.name and "treated_as_unknown" not in derived.info
        assert derived(cand).item() == pytest.approx(own(cand).item(), rel=1e-5)
    rec = run_attack("inverting_gradients", minimal, QUICK, seed=0, progress=False)
    assert rec.threat_model["objective"] == derived.name
    assert rec.threat_model["obfuscation"] == [name]


@pytest.mark.parametrize("specs,records,protocol", [
    # ROG's keys and other names in a foreign record
    ([{"name": "qsgd", "levels": 8, "norm": "l2", "bucket_size": 16}],
     [{"name": "QSGD", "quant_level": 8, "norm": "L2", "bucket": 16}], None),
    ([{"name": "sign"}], [{"name": "signSGD"}], None),
    ([{"name": "topk", "sparsity": 0.95, "scope": "global"}], [{"name": "top_k", "keep": 0.05, "scope": "global"}],
     None),
    # a noise std from a DP budget (the accountant), or from the protocol's per-example clipping
    ([{"name": "gaussian", "clip": 1.0, "target_epsilon": 50}], [{"name": "gaussian", "clip": 1.0, "epsilon": 50}],
     None),
    ([{"name": "gaussian", "noise_multiplier": 0.05}], [{"name": "gaussian", "z": 0.05}],
     Protocol(per_example_clip=1.0)),
    # compositions: a sparsifier's mask with the quantizer after it
    ([{"name": "topk", "keep": 0.2}, {"name": "qsgd", "levels": 8}],
     [{"name": "topk", "keep": 0.2}, {"name": "qsgd", "levels": 8}], None),
    ([{"name": "randk", "keep": 0.3}, {"name": "uniform", "bits": 6}],
     [{"name": "randk", "keep": 0.3}, {"name": "uniform", "bits": 6}], None),
])
def test_derived_values_match_the_records_gradleak_writes(specs, records, protocol):
    obs, _ = tiny_observation("lenet_zhu", n=2, obfuscations=specs, obfuscation_seed=0, protocol=protocol)
    target = Simulator(obs).target
    own = for_observation(obs, target, "cosine", True, S)
    derived = for_observation(with_records(obs, records), target, "cosine", True, S)
    assert derived.name == own.name and "treated_as_unknown" not in derived.info
    cand = candidate(target)
    assert derived(cand).item() == pytest.approx(own(cand).item(), rel=1e-5)


def test_a_step_read_off_an_update_that_later_steps_changed_is_treated_as_unknown():
    # uniform's steps are read off the update; top-k after it changed the update, so only its mask counts
    specs = [{"name": "uniform", "bits": 4}, {"name": "topk", "keep": 0.3}]
    obs, _ = tiny_observation("lenet_zhu", n=2, obfuscations=specs)
    rec = run_attack("inverting_gradients", with_records(obs, specs), QUICK, seed=0, progress=False)
    assert rec.threat_model["objective"] == ("masked cosine + bound on unsent entries; obfuscation step 1 "
                                             "(uniform) treated as unknown: its steps would be read off the "
                                             "update, which later steps changed")
    # gradleak's own records carry the steps: the rounding cells are used
    assert run_attack("inverting_gradients", obs, QUICK, seed=0, progress=False).threat_model["objective"] == \
        "rounding-cell distance"


def test_no_step_is_read_off_the_mean_of_several_clients_updates():
    # each client rounded to its own grid; the mean's largest entry is no client's: the steps come from the
    # records (per client) or not at all, never from the mean
    from gradleak.attacks.aware import steps
    from gradleak.federated import Protocol

    specs = [{"name": "uniform", "bits": 8}]
    obs, _ = tiny_observation("lenet_zhu", n=4, obfuscations=specs, protocol=Protocol(num_clients_averaged=2))
    read = steps(obs, Simulator(obs).target)
    assert read[0].values is None and read[0].why == ("its steps would be read off the update, the mean of 2 "
                                                      "clients' updates, no client's own")
    assert len(obs.obfuscation[0]["per_client"]) == 2  # the clients' own steps stay in the record
    one, _ = tiny_observation("lenet_zhu", n=4, obfuscations=specs)
    assert steps(with_records(one, specs), Simulator(one).target)[0].values["scale"]  # one client: read off


@pytest.mark.parametrize("records,why", [
    ([{"name": "qsgd", "levels": 1}], "its record's parameters are invalid (obfuscation 'qsgd': levels must be "
                                      "an integer >= 2, got 1)"),
    ([{"name": "qsgd", "s": "fifteen"}], "its record: s must be an integer >= 1, got 'fifteen'"),
    ([{"name": "uniform", "scale": -1.0}], "its record: scale must be a number >= 0"),
    ([{"name": "gaussian", "noise_multiplier": 0.1}], "noise_multiplier needs a clip norm"),
    ([{"name": "gaussian", "clip": 1.0, "noise_multiplier": 0.1, "target_epsilon": 3}], "give exactly one of"),
    ([{"name": "laplace"}], "needs scale=..."),
    ([{"name": "laplace", "sigma": {"fc.weight": 0.1}}], "its record's sigma names no value for tensor"),
    # the mask random-k sent is visible whatever its record says: only its rescaling is unknown
    ([{"name": "randk", "keep": "most"}], "keep must be a number in (0, 1], got 'most'"),
    ([{"name": "topk"}, {"name": "snr_gaussian", "snr_db": "loud"}], "snr_db must be a number, got 'loud'"),
])
def test_a_record_that_cannot_be_read_falls_back_to_the_plain_objective_for_that_step(records, why):
    obs, _ = tiny_observation("lenet_zhu", n=2)
    rec = run_attack("inverting_gradients", with_records(obs, records), QUICK, seed=0, progress=False)
    step = len(records)
    objective = rec.threat_model["objective"]
    plain = "masked cosine; " if records[-1]["name"] == "randk" else "cosine; "
    assert objective.startswith(plain) and f"obfuscation step {step} ({ob.canonical(records[-1]['name'])}) " \
        f"treated as unknown: " in objective and why in objective, objective


def test_an_unknown_name_in_a_record_is_one_line_naming_it():
    obs, _ = tiny_observation("lenet_zhu", n=2)
    for records, fragment in [([{"name": "topk"}, {"name": "qsdg", "levels": 4}],
                               "the observation's obfuscation record 2: unknown obfuscation 'qsdg' "
                               "(did you mean 'qsgd'?)"),
                              ([{"name": None}], "unknown obfuscation 'None' (did you mean 'none'?)")]:
        with pytest.raises(UserError) as e:
            run_attack("inverting_gradients", with_records(obs, records), QUICK, seed=0, progress=False)
        assert fragment in str(e.value) and "\n" not in str(e.value)
    # an attacker that is not told the obfuscation does not read the records
    rec = run_attack("inverting_gradients", with_records(obs, [{"name": "qsdg"}]),
                     {**QUICK, "attacker_knows_obfuscation": False}, seed=0, progress=False)
    assert rec.threat_model["objective"] == "cosine"


# ------------------------------------------------------------------------- an obfuscation added later
class GridParams(Params):
    step: Number = 1e-3


class GridServer(ServerValues):
    scale: PerTensor


def _grid(update, params, generator, context):
    step = params["step"]
    return ob.Result({k: torch.round(v / step) * step for k, v in update.items()}, None, {})


@pytest.fixture
def grid(monkeypatch):
    """A deterministic rounding to a fixed grid, registered for one test only."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "NAME_ALIASES", dict(registry.NAME_ALIASES))
    return ob.register(ob.Obfuscation("grid", _grid, GridParams, family="quantize", keeps_zeros=True,
                                      server=GridServer, derive=lambda p, received: {"scale": p["step"]}))


def test_an_obfuscation_registered_with_a_family_is_attacked_with_no_change_to_the_attack(grid):
    obs, truth = tiny_observation("lenet_zhu", n=2, obfuscations=[{"name": "grid", "step": 1e-3}])
    assert obs.obfuscation[0]["name"] == "grid"
    sim = Simulator(obs)
    matching = for_observation(obs, sim.target, "cosine", True, S)
    assert matching.name == "rounding-cell distance"
    # the client's true gradient lies in every rounding cell: only the small pull to the centres remains
    assert matching(sim.update(truth.images, truth.labels)).item() <= 0.01 * 0.25 + 1e-6
    assert matching(candidate(sim.target)).item() > 1.0


# --------------------------------------------------------------------------------------------- CLI
def test_cli_attacks_an_observation_whose_records_another_tool_wrote(tmp_path):
    obs_path = tmp_path / "cap" / "obs.pt"
    gradleak("capture", "--size", 16, "--arch", "lenet_zhu", "--batch-size", 2, "--obfuscation", "qsgd:levels=16",
             "--seed", 1, "--out", obs_path)
    obs = observation.load(obs_path)
    assert "s" in obs.obfuscation[0]
    cases = {"qsgd.pt": [{"name": "qsgd", "levels": 16}],
             "relative.pt": [{"name": "nvflare", "sigma0": 0.1}],
             "typo.pt": [{"name": "qsdg", "levels": 16}]}
    for file, records in cases.items():
        observation.save(with_records(obs, records), tmp_path / file)

    def attack(file):
        return gradleak("attack", "--observation", tmp_path / file, "--attack", "ig", "--iterations", 2,
                        "--restarts", 1, "--quiet", "--out", tmp_path / file.replace(".pt", ""), check=False)

    for file, objective in [("qsgd.pt", "qsgd likelihood"),
                            ("relative.pt", "cosine; obfuscation step 1 (relative_gaussian) treated as unknown")]:
        p = attack(file)
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        tm = json.loads((tmp_path / file.replace(".pt", "") / "attack.json").read_text())["threat_model"]
        assert tm["objective"].startswith(objective), tm
    assert_user_error(attack("typo.pt"), "unknown obfuscation 'qsdg' (did you mean 'qsgd'?)")
    assert not (tmp_path / "typo").exists()
