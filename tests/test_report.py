"""The HTML report: self-contained, complete, and rendered by a real browser (headless Chromium)."""

import json
import re
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
from PIL import Image
from test_cli import gradleak

from gradleak.report.render import write_report
from gradleak.report.verdicts import above_chance


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _chrome(url: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="gradleak-chromium-") as profile:
        return subprocess.run(
            [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}", *args, url],
            capture_output=True, text=True, timeout=timeout)


def test_report_is_self_contained_and_complete(tiny_sweep, tmp_path):
    folder, _ = tiny_sweep
    out = write_report(folder, out=tmp_path / "r" / "report.html")
    page = out.read_text()
    assert (tmp_path / "r" / "privacy_utility.png").is_file()
    Image.open(tmp_path / "r" / "privacy_utility.png").verify()
    # no network, no scripts: every picture is embedded
    assert "<script" not in page
    assert not re.search(r"""(src|href)=['"]?(https?:)?//""", page)
    assert page.count("data:image/png;base64,") >= 4  # originals, two defences, the plot
    # the summary table per defence and strength, with every column named
    for heading in ("Defence", "Strength", "PSNR (dB)", "SSIM", "MS-SSIM", "Patients re-identified",
                    "IIP", "Model ROC AUC", "Model accuracy", "Bits per update", "&epsilon;"):
        assert heading in page, heading
    assert "fedavg" in page and "none" in page
    assert re.search(r"patient re-identified in \d+/2 cases", page)
    # metric variants and threat models are spelled out
    assert "standard Gaussian window" in page and "MS-SSIM (Wang et al. 2003) adapted to 16 px" in page
    assert "labels inferred" in page and "identified gallery" in page and "Yin et al. 2021" in page
    assert "Failed cells" in page and "larger than the data set" in page
    assert "LPIPS" in page


def test_report_cli_on_a_single_experiment(tmp_path):
    from gradleak.experiment import config
    from gradleak.experiment.run import run_experiment

    cfg = config.from_dict({"name": "one", "output_dir": str(tmp_path / "experiments"),
                            "data": {"source": "phantoms", "size": 16, "n": 16},
                            "capture": {"arch": "lenet_zhu", "batch_size": 2},
                            "attack": {"name": "ig", "settings": {"iterations": 5, "restarts": 1}}})
    folder, metrics = run_experiment(cfg, progress=False)
    # metrics.json carries the blind baseline, the gain over it, the budget and patient re-identification
    assert {"baseline", "gain_over_baseline", "budget", "converged", "reid"} <= set(metrics)
    assert {"psnr_db", "ssim", "ssim_skill"} <= set(metrics["gain_over_baseline"])
    assert metrics["gain_over_baseline"]["psnr_db"] == pytest.approx(metrics["psnr"] - metrics["baseline"]["psnr"])
    assert metrics["budget"]["iterations"] == 5 and metrics["budget"]["seconds_per_iteration"] > 0
    assert metrics["baseline"]["auxiliary_data"]["excluded_patients"] >= 1
    assert metrics["reid"]["leave_the_image_out"] and metrics["reid"]["chance_top1"] is not None
    assert (folder / "baseline.npz").is_file()
    p = gradleak("report", folder)
    assert str(folder / "report.html") in p.stdout
    page = (folder / "report.html").read_text()
    assert "Privacy report: one" in page and "inverting_gradients" in page
    # five iterations: never "low risk", always the budget
    assert "inconclusive: the attack stopped before converging" in page.lower()
    assert "low risk" not in page.split("Verdict per defence setting")[1].split("</ul>")[0]
    assert "5 iterations in" in page and "Blind baseline" in page


def test_re_identification_must_beat_guessing():
    assert above_chance(9, 10, 0.05)
    assert not above_chance(2, 4, 0.125)  # could be luck among three rankings
    assert not above_chance(0, 10, 0.1) and not above_chance(None, None, None)


def test_report_renders_in_headless_chromium(tiny_sweep, tmp_path):
    if _chromium() is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    folder, _ = tiny_sweep
    report = write_report(folder, out=tmp_path / "report.html")
    url = report.resolve().as_uri()
    dom = _chrome(url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout
    assert "Privacy report: tiny" in html
    tables = re.findall(r"<table", html)
    assert len(tables) >= 3  # summary, image grid, all settings
    summary = html[html.index("Summary per defence"):html.index("What the server reconstructed")]
    assert len(re.findall(r"<tr>", summary)) == 3  # header + two settings
    assert len(re.findall(r"<img ", html)) >= 4
    shot = tmp_path / "shot.png"
    r = _chrome(url, f"--screenshot={shot}", "--window-size=1280,1800", "--hide-scrollbars")
    assert r.returncode == 0 and shot.is_file(), r.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert img.shape == (1800, 1280)
    assert img.std() > 10  # text, tables and pictures, not a blank page
    # the top of the page is the title and the bottom line, dark text on white
    top = img[:200]
    assert (top < 80).mean() > 0.005 and (top > 240).mean() > 0.5


def test_settings_are_grouped_by_defence_and_judged_by_the_worst_case_attack():
    from gradleak.report.summary import groups

    def row(setting, attack, ssim, hits):
        return {"setting": setting, "attack": attack, "status": "ok",
                "params": {"capture.obfuscation": setting, "attack": {"name": attack, "settings": {"lr": 0.1}}},
                "metrics": {"psnr": 20.0, "ssim": ssim, "num_images": 4},
                "reid": {"strongest": {"top1_hits": hits, "n": 4, "distance": "mse", "iip": 0.0, "top5": 0.0},
                         "chance_top1": 0.01, "by_distance": {"mse": {"top1": hits / 4}}}}

    rows = [row("none", "inverting_gradients", 0.65, 4), row("none", "rog", 0.75, 0),
            row("sign", "inverting_gradients", 0.10, 0), row("sign", "rog", 0.35, 0)]
    gs, varying = groups(rows)
    assert [g.label for g in gs] == ["none", "sign"] and varying == []  # the attack is not a defence
    # both attacks make 'none' high risk; the one that re-identifies patients is the worst case
    assert gs[0].worst_case()["attack"] == "inverting_gradients"
    # under 'sign' only ROG reaches partly recognisable images
    assert gs[1].worst_case()["attack"] == "rog"


def _tiny_attack_folder(tmp_path, iterations=5):
    """A `gradleak attack --truth` output folder on 16 px phantoms (the attack's own folder, no truth copy)."""
    obs = tmp_path / "cap" / "obs.pt"
    gradleak("capture", "--data", "phantoms:n=24", "--size", 16, "--batch-size", 2, "--arch", "lenet_zhu",
             "--out", obs)
    out = tmp_path / "attack"
    p = gradleak("attack", "--observation", obs, "--attack", "ig", "--out", out, "--truth",
                 tmp_path / "cap" / "truth.npz", "--iterations", iterations, "--restarts", 1, "--quiet")
    return out, p


def test_attack_folder_report_shows_its_images_in_headless_chromium(tmp_path):
    out, p = _tiny_attack_folder(tmp_path)
    assert "blind baseline" in p.stdout and "leave-the-image-out" in p.stdout
    r = gradleak("report", out)
    page = (out / "report.html").read_text()
    assert str(out / "report.html") in r.stdout
    assert "No reconstructions on disk" not in page
    for alt in ("original images", "blind baseline", "reconstruction under none by inverting_gradients"):
        assert f"alt='{alt}'" in page, alt
    # every image at least 128 px on screen: the grids are drawn at 128 px a tile and never shrunk
    sizes = [(int(w), int(h)) for w, h in re.findall(r"<img alt='[^']*' width='(\d+)' height='(\d+)'", page)]
    assert len(sizes) == 3 and all(h >= 128 and w >= 2 * 128 for w, h in sizes)
    assert "max-width:none" in page
    # the budget and the convergence stand next to the verdict; 5 iterations cannot show an absence
    assert "5 iterations in" in page and "inconclusive: the attack stopped before converging" in page.lower()
    assert "low risk" not in page.split("Verdict per defence setting")[1].split("</ul>")[0]
    if _chromium() is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    url = (out / "report.html").resolve().as_uri()
    dom = _chrome(url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert len(re.findall(r"<img ", dom.stdout)) >= 4  # originals, baseline, reconstruction, plot
    shot = tmp_path / "shot.png"
    s = _chrome(url, f"--screenshot={shot}", "--window-size=1280,2600", "--hide-scrollbars")
    assert s.returncode == 0 and shot.is_file(), s.stderr[-2000:]
    img = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    # the image grid: somewhere on the page a 128 px tall band holds grey X-ray pixels (not text on white)
    grey = ((img > 20) & (img < 235)).mean(axis=1)
    run = best = 0
    for v in grey > 0.1:
        run = run + 1 if v else 0
        best = max(best, run)
    assert best >= 128, best


def test_report_on_a_folder_without_results_is_one_line_exit_2(tmp_path):
    from test_cli import assert_user_error

    (tmp_path / "empty").mkdir()
    assert_user_error(gradleak("report", tmp_path / "empty", check=False), "no readable results")
    assert_user_error(gradleak("report", tmp_path / "missing", check=False), "not found")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.json").write_text("{not json")
    assert_user_error(gradleak("report", bad, check=False), "metrics.json")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    failed = {"cell": "0000-x", "index": 0, "status": "failed", "setting": "none", "attack": "inverting_gradients",
              "params": {}, "error": "boom"}  # a whole row, as a sweep writes a failed cell
    (sweep / "results.jsonl").write_text(json.dumps(failed) + "\n")
    assert_user_error(gradleak("report", sweep, check=False), "no finished cell")
    assert not (tmp_path / "empty" / "report.html").exists()


def test_names_from_the_results_are_escaped_and_the_page_stays_self_contained(tiny_sweep, tmp_path):
    import yaml

    folder = tmp_path / "sweep"
    shutil.copytree(tiny_sweep[0], folder)
    hostile = "<script>alert('x')</script> & co"
    rows = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    for r in rows:
        if r["status"] == "ok":
            r["setting"] = f"{r['setting']} {hostile}"
            r["attack"] = f"ig {hostile}"
            r["config"]["data"]["path"] = f"/data/{hostile}"
        else:
            r["error"] = f"failed {hostile}"
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = yaml.safe_load((folder / "sweep.yaml").read_text())
    (folder / "sweep.yaml").write_text(yaml.safe_dump({**spec, "name": f"study {hostile}"}))

    page = write_report(folder, out=tmp_path / "report.html").read_text()
    assert "<script" not in page and "alert('x')" not in page
    escaped = "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; co"
    assert f"<title>gradleak privacy report: study {escaped}</title>" in page
    assert f"<b>none {escaped}</b>" in page  # the setting, in the verdict list
    assert f"alt='reconstruction under none {escaped} by ig {escaped}'" in page  # an image's alt text
    assert f"/data/{escaped}" in page and f"failed {escaped}" in page
    # the stylesheet is inlined as it is (quotes not escaped), nothing is loaded from elsewhere
    assert 'font-family:-apple-system,"Segoe UI"' in page and "<link" not in page


def test_report_says_how_the_update_leaked_and_that_the_server_saw_a_mean_of_clients(tmp_path):
    from gradleak.experiment import config
    from gradleak.experiment.run import run_experiment

    cfg = config.from_dict({"name": "secagg", "output_dir": str(tmp_path / "experiments"),
                            "data": {"source": "phantoms", "size": 16, "n": 32},
                            "capture": {"arch": "lenet5", "batch_size": 2, "protocol": {"num_clients_averaged": 2},
                                        "obfuscation": [{"name": "qsgd", "levels": 16}]},
                            "attack": {"name": "auto", "settings": {"time_budget": 10}}})
    folder, metrics = run_experiment(cfg, progress=False)
    assert metrics["threat_model"]["clients_averaged"] == 2 and metrics["threat_model"]["per_client_scales_known"]
    assert metrics["budget"]["pipeline"]["separated"] == 4
    gradleak("report", folder)
    page = (folder / "report.html").read_text().replace("&#39;", "'")
    verdicts = page.split("Verdict per defence setting")[1].split("</ul>")[0]
    assert ("How it leaked: the update of 'fc1', a linear layer into a ReLU, carries each image's input to it; "
            "it separated into 4 of 4 images after the mean of 2 clients' updates was split into each "
            "client's") in verdicts
    assert "protocol: fedsgd, mean of 2 clients" in page
    threats = page.split("<h3>Threat models</h3>")[1].split("</ul>")[0]
    assert "protocol fedsgd, the mean of 2 clients' updates (secure aggregation)" in threats
    assert "each client's rounding scale known to the server" in threats
