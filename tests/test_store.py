"""The result store: the typed row, results.jsonl (appending, reading, a line cut by a kill), the CSV export,
and damaged result folders, which are one-line errors naming the file (also from `gradleak report`)."""

import json

import pytest
from test_cli import assert_user_error, gradleak

from gradleak.errors import UserError
from gradleak.experiment.store import ResultRow, ResultStore, read_results, read_utilities


def _row(cell="0000-abc", index=0, status="ok", **extra):
    """A row with every field a sweep writes, in the order it writes them."""
    row = {"cell": cell, "index": index, "status": status, "setting": "qsgd(levels=16)", "attack": "ig",
           "params": {"capture.obfuscation": [{"name": "qsgd", "levels": 16}]}}
    if status == "ok":
        row.update(metrics={"psnr": 14.5, "ssim": 0.41, "ms_ssim": 0.5, "num_images": 2},
                   per_image=[{"psnr": 14.0, "paired_reconstruction": 1}], metric_variants={"ssim": "standard"},
                   baseline={"psnr": 11.0, "ssim": 0.2}, gain_over_baseline={"psnr_db": 3.5, "ssim": 0.21},
                   budget={"iterations": 20, "seconds": 1.5}, converged=False, threat_model={"labels_known": False},
                   reid={"strongest": {"top1": 0.5}}, bits=123456, obfuscation=[{"name": "qsgd", "epsilon": None}],
                   epsilon=None)
    else:
        row["error"] = "UserError: batch larger than the data set"
    row.update(utility_key=None, attack_run={"iterations": 20}, timings={"cell_s": 2.0, "started": None},
               host="h", backend="local", versions={"torch": "2"}, config={"seed": 0})
    row.update(extra)
    return row


def test_a_row_gives_back_exactly_what_it_was_made_of():
    for data in (_row(), _row(status="failed"), _row(future_key={"kept": True})):
        row = ResultRow.from_dict(data, "here")
        assert row.as_dict() == data and list(row.as_dict()) == list(data)
        assert row.to_json() == json.dumps(data)
        assert ResultRow.from_json(row.to_json(), "here") == row
    assert isinstance(ResultRow.from_dict(_row(), "here").as_dict()["bits"], int)  # numbers keep their type
    assert ResultRow.from_dict(_row(status="failed"), "here").metrics is None
    minimal = {"cell": "0000-x", "status": "failed", "error": "boom"}  # a failed row needs no more
    assert ResultRow.from_dict(minimal, "here").as_dict() == minimal


@pytest.mark.parametrize("text,message", [
    ("{not json", "here: not JSON"),
    ("[1, 2]", "here: a result row is a JSON object, got list"),
    (json.dumps({k: v for k, v in _row().items() if k != "cell"}), "here: not a result row (cell: Field required)"),
    (json.dumps(_row(index="3")), "(index: Input should be a valid integer)"),
    (json.dumps(_row(status="done")), "status: Input should be 'ok' or 'failed'"),
    (json.dumps({k: v for k, v in _row().items() if k != "setting"}), "a row with status 'ok' needs setting"),
    (json.dumps({"cell": "x", "index": 0}), "(status: Field required)"),
    (json.dumps(_row(metrics={"psnr": "high"})), "needs metrics with a number for psnr and ssim"),
    (json.dumps(_row(reid=[1])), "(reid: Input should be a valid dictionary)"),
])
def test_a_damaged_row_is_one_line_naming_where(text, message):
    with pytest.raises(UserError) as e:
        ResultRow.from_json(text, "here")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_store_appends_reads_the_last_row_of_a_cell_and_forgives_only_a_cut_last_line(tmp_path):
    store = ResultStore(tmp_path)
    assert store.read() == {}
    store.append(ResultRow.from_dict(_row("a", 0, status="failed"), "t"))
    store.append(ResultRow.from_dict(_row("b", 1), "t"))
    store.append(ResultRow.from_dict(_row("a", 0), "t"))  # retried: the last row wins
    rows = store.read()
    assert list(rows) == ["a", "b"] and rows["a"].status == "ok"
    with open(store.path, "a") as f:  # a kill while appending
        f.write('{"cell": "c", "index"')
    assert list(store.read()) == ["a", "b"]
    store.rewrite(rows.values())
    assert [json.loads(x)["cell"] for x in store.path.read_text().splitlines()] == ["a", "b"]
    # damage anywhere else is an error that names the file and the line
    lines = store.path.read_text().splitlines()
    store.path.write_text(lines[0] + "\ngarbage\n" + lines[1] + "\n")
    with pytest.raises(UserError, match=r"results.jsonl line 2: not JSON"):
        store.read()
    store.path.write_bytes(lines[0].encode() + b"\n\xff\xfe\x00\n")
    with pytest.raises(UserError, match=r"results.jsonl line 2: not UTF-8 text"):
        store.read()
    store.path.write_text(lines[0] + "\n" + json.dumps({"index": 1, "status": "ok"}) + "\n")
    with pytest.raises(UserError, match=r"line 2: not a result row \(cell: Field required\)"):
        store.read()


def test_export_writes_one_flat_row_per_cell(tmp_path):
    store = ResultStore(tmp_path)
    rows = [ResultRow.from_dict(_row("a", 0, utility_key="u"), "t"), ResultRow.from_dict(_row("b", 1, status="failed"), "t")]
    written = store.export_tables(rows, {"u": {"final": {"roc_auc": 0.7}, "epsilon": [1.0, 2.0]}})
    assert written[0] == tmp_path / "results.csv"
    header, first, second = (tmp_path / "results.csv").read_text().splitlines()
    columns = header.split(",")
    assert {"cell", "metrics.psnr", "baseline.ssim", "gain_over_baseline.psnr_db", "reid.strongest.top1",
            "utility.roc_auc", "utility.epsilon", "error", "config"} <= set(columns)
    assert "per_image" not in header and "metric_variants" not in header
    flat = rows[0].flat_row({"final": {"roc_auc": 0.7}})
    assert flat["metrics.psnr"] == 14.5 and flat["utility.roc_auc"] == 0.7 and flat["config"] == '{"seed": 0}'
    assert first.startswith("a,0,ok,")
    assert second.startswith("b,1,failed,")


# ------------------------------------------------------------------------------------- damaged folders
def _sweep_folder(tmp_path, lines):
    folder = tmp_path / "sweep"
    folder.mkdir(parents=True)
    (folder / "results.jsonl").write_text("".join(x + "\n" for x in lines))
    return folder


def _experiment_folder(tmp_path, metrics_text, **files):
    folder = tmp_path / "run"
    folder.mkdir(parents=True)
    (folder / "metrics.json").write_text(metrics_text)
    for name, text in files.items():
        (folder / name.replace("_", ".")).write_text(text)
    return folder


def test_read_results_refuses_damaged_folders_naming_the_file(tmp_path):
    good = json.dumps(_row())
    rows, spec, kind = read_results(_sweep_folder(tmp_path, [good]))
    assert kind == "sweep" and spec == {} and rows[0]["_folder"].endswith("cells/0000-abc")
    cases = [
        (lambda: _sweep_folder(tmp_path / "g", ["\x00garbage", good]), "results.jsonl line 1: not JSON"),
        (lambda: _sweep_folder(tmp_path / "n", [good, json.dumps({"status": "ok", "index": 0})]),
         "results.jsonl line 2: not a result row (cell: Field required)"),
        (lambda: _experiment_folder(tmp_path / "l", "[1, 2, 3]"), "metrics.json: holds no scored reconstruction"),
        (lambda: _experiment_folder(tmp_path / "t", '{"psnr": 12.0, "ssim": 0.'), "metrics.json: not a readable JSON"),
        (lambda: _experiment_folder(tmp_path / "m", '{"psnr": 12.0, "ssim": 0.3, "threat_model": [1]}'),
         "metrics.json: 'threat_model' is a list, not a mapping"),
        (lambda: _experiment_folder(tmp_path / "a", '{"psnr": 12.0, "ssim": 0.3}', attack_json="[]"),
         "attack.json: holds a list, not a JSON object"),
    ]
    for make, message in cases:
        folder = make()
        with pytest.raises(UserError) as e:
            read_results(folder)
        assert message in str(e.value) and str(folder) in str(e.value), str(e.value)
    # an experiment folder whose config.yaml is not a mapping is read without it
    folder = _experiment_folder(tmp_path / "c", '{"psnr": 12.0, "ssim": 0.3}', config_yaml="- a\n- b\n")
    assert read_results(folder)[0][0]["setting"] == "none"


def test_read_utilities_refuses_a_damaged_result(tmp_path):
    d = tmp_path / "utility" / "abc"
    d.mkdir(parents=True)
    (d / "result.json").write_text('["not", "a", "result"]')
    with pytest.raises(UserError, match=r"abc/result.json: holds a list"):
        read_utilities(tmp_path)
    (d / "result.json").write_text('{"status": "ok", "utility": {"final": ')
    with pytest.raises(UserError, match=r"abc/result.json: not a readable JSON file"):
        read_utilities(tmp_path)


def test_report_on_damaged_folders_is_one_line_and_exit_2(tmp_path):
    folder = _sweep_folder(tmp_path, ["garbage"])
    assert_user_error(gradleak("report", folder, check=False), str(folder / "results.jsonl"), "line 1")
    (folder / "results.jsonl").write_text(json.dumps({"index": 0, "status": "ok"}) + "\n")
    assert_user_error(gradleak("report", folder, check=False), "line 1", "cell")
    run = _experiment_folder(tmp_path, "[1, 2]")
    assert_user_error(gradleak("report", run, check=False), str(run / "metrics.json"))
    (run / "metrics.json").write_text('{"psnr": 12.0, "ss')
    assert_user_error(gradleak("report", run, check=False), str(run / "metrics.json"), "not a readable JSON file")
    assert not (folder / "report.html").exists() and not (run / "report.html").exists()
