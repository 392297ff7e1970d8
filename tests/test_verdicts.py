"""Verdicts judged on the gain over the blind baseline, on re-identification and on convergence."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradleak.metrics import score
from gradleak.metrics.baseline import blind_guesses, score_guesses, ssim_skill, with_baseline
from gradleak.report.summary import verdict
from gradleak.report.verdicts import (ATTACK_STRENGTH, INCONCLUSIVE, image_level, risk, strongest_tried)


def _images(n=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    body = torch.sigmoid((0.8 - (xx.abs() + 0.5 * yy.abs())) * 6)
    return (0.7 * body + 0.3 * torch.rand(n, 1, size, size, generator=g)).clamp(0, 1)


def _stats(skill=0.0, converged=(True,), hits=0, n=4, chance=0.05, baseline=0.7):
    ssim_ = baseline + skill * (1 - baseline)
    return {"attack": "inverting_gradients", "ssim": ssim_, "baseline_ssim": baseline, "ssim_skill": skill,
            "gain_psnr": 0.0, "gain_ssim": ssim_ - baseline, "converged": list(converged),
            "iterations": 200, "seconds": 12.0, "seconds_per_iteration": 0.06,
            "reid_hits": hits, "reid_n": n, "top5_hits": hits, "chance": chance, "reid_rankings": ["mse"],
            "leave_the_image_out": True, "iip_hits": 0, "iip_n": n}


def test_blind_guesses_are_the_mean_and_the_auxiliary_image_nearest_it():
    aux = torch.stack([torch.full((1, 4, 4), v) for v in (0.0, 0.4, 0.5, 1.0)])
    g = blind_guesses(aux)
    assert torch.allclose(g["mean_image"], torch.full((1, 1, 4, 4), 0.475))
    assert torch.equal(g["nearest_to_mean"], aux[2:3])
    with pytest.raises(ValueError):
        blind_guesses(torch.zeros(0, 1, 4, 4))


def test_a_reconstruction_equal_to_the_baseline_is_not_recognisable():
    truth = _images(3)
    aux = _images(20, seed=1)
    guesses = blind_guesses(aux)
    rec = guesses["mean_image"].expand_as(truth).clone()  # the attack returned the blind guess itself
    m = with_baseline(score(truth, None, rec, None), truth, guesses)
    g = m["gain_over_baseline"]
    assert g["psnr_db"] <= 1e-6 and g["ssim"] <= 1e-6 and g["ssim_skill"] <= 1e-6
    assert image_level(g["ssim_skill"]) == "not"
    s = {**_stats(skill=g["ssim_skill"], baseline=m["baseline"]["ssim"]), "ssim": m["ssim"]}
    assert risk(s) == "low"  # converged, nothing beyond the guess, nobody re-identified
    assert "not recognisable" in verdict(s, None, None).lower()
    # ... even when its raw SSIM is high
    assert m["ssim"] > 0.5
    # and the original itself is recognisable
    perfect = with_baseline(score(truth, None, truth.clone(), None), truth, guesses)
    assert perfect["gain_over_baseline"]["ssim_skill"] == pytest.approx(1.0)
    assert image_level(perfect["gain_over_baseline"]["ssim_skill"]) == "recognisable"
    assert [set(p) >= {"baseline_ssim", "gain_ssim", "gain_psnr_db"} for p in perfect["per_image"]] == [True] * 3


def test_the_baseline_takes_the_better_guess_metric_by_metric():
    truth = _images(2)
    guesses = blind_guesses(_images(10, seed=2))
    b = score_guesses(truth, guesses)
    for k in ("psnr", "ssim"):
        assert b[k] == pytest.approx(max(b["guesses"][n][k] for n in guesses))
    assert b["mse"] == pytest.approx(min(b["guesses"][n]["mse"] for n in guesses))
    assert ssim_skill(0.9, 0.8) == pytest.approx(0.5) and ssim_skill(0.5, 0.8) < 0


@pytest.mark.parametrize("converged", [(False,), (None,), (True, False), (True, None)])
def test_an_unconverged_run_is_never_low_risk(converged):
    s = _stats(skill=0.0, converged=converged)
    assert risk(s) == "inconclusive"
    text = verdict(s, None, None)
    assert text.startswith("Inconclusive: the attack stopped before converging") and "low risk" not in text
    assert "200 iterations in 12 s" in text  # the budget stands next to the verdict
    # a leak shown by an unconverged attack still counts
    assert risk(_stats(skill=0.9, converged=converged)) == "high"
    assert risk({**_stats(skill=0.0, converged=(True,))}) == "low"


@settings(max_examples=60, deadline=None)
@given(skill=st.floats(-3, 1), hits=st.integers(0, 8), conv=st.lists(st.sampled_from([True, False, None]),
                                                                      min_size=1, max_size=4))
def test_low_risk_needs_every_attack_converged_and_nothing_beyond_the_guess(skill, hits, conv):
    s = _stats(skill=skill, converged=conv, hits=hits, n=8, chance=0.05)
    r = risk(s)
    if r == "low":
        assert all(c is True for c in conv) and image_level(skill) == "not"
    if not all(c is True for c in conv):
        assert r != "low"
    assert INCONCLUSIVE.startswith("inconclusive")


def test_raw_ssim_alone_is_not_a_verdict():
    # SSIM 0.82 was "recognisable" by the old fixed threshold (0.6), but the blind guess already scores 0.8
    s = {**_stats(skill=ssim_skill(0.82, 0.8), baseline=0.8), "ssim": 0.82}
    assert image_level(s["ssim_skill"]) == "not" and risk(s) == "low"
    # re-identification above chance is a leak whatever the images look like
    assert risk(_stats(skill=0.0, hits=4, n=4, chance=0.05)) == "high"
    assert risk(_stats(skill=0.0, hits=2, n=8, chance=0.02)) == "moderate"


def test_strongest_attack_tried_and_the_stronger_ones_not_run():
    assert strongest_tried(["inverting_gradients", "dlg"]) == ("inverting_gradients", ["auto", "rog"])
    assert strongest_tried(["rog", "rog + prior", "idlg"]) == ("rog + prior", ["auto"])
    assert strongest_tried(["auto", "rog"]) == ("auto", [])
    assert strongest_tried(["my_attack"]) == ("my_attack", list(ATTACK_STRENGTH))


def test_utility_runs_over_seeds_give_a_mean_and_a_95_percent_interval(tmp_path):
    import json

    from scipy.stats import t

    from gradleak.experiment.store import aggregate_utility, read_utilities
    from gradleak.report.summary import auc_text

    aucs = [0.70, 0.74, 0.66]
    for k, auc in enumerate(aucs):
        d = tmp_path / "utility" / ("abc" if k == 0 else f"abc-s{k}")
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"status": "ok", "utility": {
            "final": {"roc_auc": auc, "accuracy": 0.6}, "epsilon": [1.0, 2.0 + k], "delta": 1e-5}}))
    (tmp_path / "utility" / "zzz").mkdir()
    (tmp_path / "utility" / "zzz" / "result.json").write_text(json.dumps({"status": "ok", "utility": {
        "final": {"roc_auc": 0.5}}}))
    u = read_utilities(tmp_path)
    assert set(u) == {"abc", "zzz"} and u["abc"]["seeds"] == 3 and u["zzz"]["seeds"] == 1
    half = t.ppf(0.975, 2) * np.std(aucs, ddof=1) / np.sqrt(3)
    assert u["abc"]["final"]["roc_auc"] == pytest.approx(0.70)
    assert u["abc"]["final_ci95"]["roc_auc"] == pytest.approx([0.70 - half, 0.70 + half])
    assert u["abc"]["epsilon"] == 4.0  # the largest spent
    assert "95% interval" in auc_text(u["abc"]) and "3 seeds" in auc_text(u["abc"])
    assert "one seed, no interval" in auc_text(u["zzz"])
    assert aggregate_utility([]) == {}


def test_utility_runs_default_to_the_attacked_architecture_and_protocol():
    from gradleak.experiment.sweep import expand, spec_from_dict, utility_config

    spec = spec_from_dict({"name": "u", "base": {"data": {"source": "phantoms", "size": 16, "n": 24},
                                                 "capture": {"arch": "lenet_zhu", "protocol": {"algorithm": "fedsgd"}}},
                           "grid": {"capture.obfuscation": ["none", "qsgd:levels=4"]},
                           "utility": {"enabled": True, "config": {"federation": {"rounds": 2}}}})
    assert spec["utility"]["seeds"] == 3
    cells = expand(spec)
    u = utility_config(spec, cells[1].config)
    assert u["model"]["arch"] == "lenet_zhu" and u["federation"]["algorithm"] == "fedsgd"
    assert u["obfuscation"] == [{"name": "qsgd", "levels": 4}]
    # a utility config that names its own model keeps it (and the report says so)
    spec2 = spec_from_dict({**spec, "utility": {"enabled": True, "config": {"model": {"arch": "convnet"}}}})
    assert utility_config(spec2, cells[0].config)["model"]["arch"] == "convnet"


def test_the_report_says_when_utility_comes_from_another_configuration():
    from gradleak.report.summary import utility_mismatch

    row = {"utility_key": "k", "config": {"capture": {"arch": "lenet5", "protocol": {"algorithm": "fedsgd"}}}}
    same = {"k": {"model": {"arch": "lenet5"}, "protocol": {"algorithm": "fedsgd"}}}
    other = {"k": {"model": {"arch": "convnet"}, "protocol": {"algorithm": "fedavg"}}}
    assert utility_mismatch([row], same) == ""
    text = utility_mismatch([row], other)
    assert "trained convnet, the attacks ran on lenet5" in text and "used fedavg, the attacked updates fedsgd" in text


def test_without_a_blind_baseline_images_are_not_judged_and_the_risk_is_not_low():
    s = {**_stats(converged=(True,)), "ssim_skill": None, "baseline_ssim": None}
    assert image_level(None) is None and risk(s) == "inconclusive"
    assert "no blind baseline" in verdict(s, None, None)


def test_the_budget_says_when_a_separated_input_was_noise():
    # auto's separation records how many of the inputs it kept read as noise (no image's): the verdict's
    # budget passes it on, summed over the setting's cells; cells without a separation say nothing
    from gradleak.report.summary import _budget_stats
    rows = [{"budget": {"converged": True, "iterations": 10, "seconds": 5.0,
                        "pipeline": {"separation": {"like_noise": k}}}} for k in (1, 0)]
    rows.append({"budget": {"converged": True, "iterations": 10, "seconds": 5.0, "pipeline": None}})
    stats = _budget_stats(rows)
    assert stats["inputs_like_noise"] == 1
    text = verdict({**_stats(skill=0.9), **stats}, None, None)
    assert "1 separated input read as noise, not an image" in text
    assert _budget_stats(rows[1:])["inputs_like_noise"] == 0 and _budget_stats(rows[2:])["inputs_like_noise"] is None
    assert "read as noise" not in verdict({**_stats(skill=0.9), **_budget_stats(rows[1:])}, None, None)


def test_a_leaky_layer_left_unseparated_is_never_low_risk():
    # auto found fc1 (a linear layer into a ReLU, whose update leaks whole batches) but separated fewer images
    # than it attacked: its fallback converged at the blind guess, which says what that attack reached, not
    # what the update holds; separated runs, and models with no such layer, keep their verdicts
    from gradleak.report.summary import _budget_stats
    from gradleak.report.verdicts import UNSEPARATED

    def row(pipeline):
        return {"budget": {"converged": True, "iterations": 10, "seconds": 5.0, "pipeline": pipeline}}
    failed = {"leaky_layer": "fc1", "separated": 0, "images": 32, "stages": ["rog"]}
    partly = {"leaky_layer": "fc1", "separated": 30, "images": 32}
    whole = {"leaky_layer": "fc1", "separated": 32, "images": 32}
    none = {"leaky_layer": None, "separated": 0, "images": 4, "stages": ["rog"]}
    stats = _budget_stats([row(failed), row(whole)])
    assert stats["unseparated"] == 1 and stats["unseparated_layers"] == ["fc1"]
    s = {**_stats(skill=0.0, converged=(True, True)), **stats}
    assert risk(s) == "inconclusive"
    text = verdict(s, None, None)
    assert text.startswith(UNSEPARATED[0].upper() + UNSEPARATED[1:]) and "never its absence" in text, text
    assert "'fc1' not separated into the images in 1 of 2 runs" in text and "low risk" not in text
    assert _budget_stats([row(partly)])["unseparated"] == 1
    for rows in ([row(whole)], [row(none)], [row(None)], [{"budget": {"converged": True}}]):
        stats = _budget_stats(rows)
        assert stats["unseparated"] == 0
        assert risk({**_stats(skill=0.0), **stats}) == "low"
    # a leak shown stays a leak, and an unconverged run still says so first
    assert risk({**_stats(skill=0.9), **_budget_stats([row(failed)])}) == "high"
    text = verdict({**_stats(skill=0.0), **_budget_stats([row(failed)]), "converged": [False]}, None, None)
    assert text.startswith("Inconclusive: the attack stopped before converging")


def test_images_that_do_not_reproduce_an_exact_update_are_never_low_risk():
    # auto separated every image, but their simulated update is no nearer the received one than uniform grey
    # images give (e.g. FedAvg local steps that overshoot): what it reached is not what the update holds
    from gradleak.report.summary import _budget_stats, leak_text
    from gradleak.report.verdicts import UNFIT

    def row(fit):
        return {"budget": {"converged": True, "iterations": 10, "seconds": 5.0,
                           "pipeline": {"leaky_layer": "fc1", "separated": 4, "images": 4, "fit": fit}}}
    bad = {"relative_residual": 5.37, "grey_residual": 0.97, "fits": False}
    good = {"relative_residual": 0.1, "grey_residual": 0.97, "fits": True}
    stats = _budget_stats([row(bad), row(good), row({"relative_residual": 4.13, "grey_residual": 0.9, "fits": False})])
    assert stats["unfit"] == 2 and (stats["unfit_residual"], stats["unfit_grey"]) == (5.37, 0.97)
    assert stats["unseparated"] == 0
    s = {**_stats(skill=0.1, converged=(True, True, True)), **stats}
    assert risk(s) == "inconclusive"
    text = verdict(s, None, None)
    assert text.startswith(UNFIT[0].upper() + UNFIT[1:]) and "never its absence" in text, text
    assert ("its images do not reproduce the update in 2 of 3 runs (relative residual 5.37 against uniform grey "
            "images' 0.97)") in text
    assert "do not reproduce the update" in leak_text({**stats, "cells": 3})
    for rows in ([row(good)], [row(None)], [{"budget": {"converged": True}}]):  # fits, or not judged
        stats = _budget_stats(rows)
        assert stats["unfit"] == 0 and stats["unfit_residual"] is None
        assert risk({**_stats(skill=0.0), **stats}) == "low"
        assert "reproduce" not in verdict({**_stats(skill=0.0), **stats}, None, None)
    # a leak shown stays a leak, and the other reasons come first
    assert risk({**_stats(skill=0.9), **_budget_stats([row(bad)])}) == "high"
    text = verdict({**_stats(skill=0.0), **_budget_stats([row(bad)]), "converged": [False]}, None, None)
    assert text.startswith("Inconclusive: the attack stopped before converging")


def test_how_the_update_leaked_is_said_only_where_auto_found_a_leaking_layer():
    from gradleak.report.summary import leak_text

    assert leak_text({"leaky_layers": []}) is None
    one = {"leaky_layers": ["fc1"], "separated": 12, "separated_of": 16, "clients_split": 0, "cells": 4}
    assert leak_text(one).endswith("it separated into 12 of 16 images")
    none = {**one, "separated": 0}
    assert leak_text(none).endswith("it did not separate into any of the 16 images")
    split = {**one, "clients_split": 2, "split_into": [4]}
    assert "after the mean of 4 clients' updates was split into each client's by their rounding steps (in 2 of 4 " \
           "cells), which needs each client's rounding scale" in leak_text(split)
    assert leak_text({**split, "split_off_the_mean": 2}).endswith("read off the mean's own values, no client's "
                                                                  "scale needed")
    assert leak_text({**split, "split_off_the_mean": 1}).endswith("in 1 of them read off the mean's own values, in "
                                                                  "the others from each client's rounding scale "
                                                                  "(the threat models say so)")


def test_the_threat_models_say_whether_the_clients_scales_were_known_to_split_their_mean():
    from gradleak.report.summary import threat_text

    tm = {"protocol": "fedsgd", "labels": "inferred", "obfuscation": ["qsgd"], "obfuscation_known": True,
          "bn_statistics": "no BatchNorm", "clients_averaged": 4}
    told, read, whole = threat_text([{"attack": "auto", "threat_model": {**tm, "per_client_scales_known": True}},
                                     {"attack": "auto", "threat_model": {**tm, "per_client_scales_known": False}},
                                     {"attack": "auto", "threat_model": tm}])
    assert all("protocol fedsgd, the mean of 4 clients' updates (secure aggregation)" in t for t in (told, read, whole))
    assert told.endswith("each client's rounding scale known to the server (the mean split into each client's update)")
    assert read.endswith("no client's rounding scale known to the server (the clients' steps read off the mean to "
                         "split it into each client's update)")
    assert whole.endswith("BatchNorm statistics: no BatchNorm")
