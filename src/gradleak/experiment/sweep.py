"""Sweeps: a grid of experiment cells run in parallel, resumable, into one folder.

A sweep spec (YAML) holds a ``base`` experiment config (the schema of ``gradleak run``) and a ``grid`` of
dotted keys, each with a list (or a range) of values::

    name: obfuscation-study
    base:
      data: {source: phantoms, size: 32}
      capture: {arch: lenet5, batch_size: 2}
      attack: {settings: {iterations: 200}}
    grid:
      capture.obfuscation: [none, "qsgd:levels=16", "topk:keep=0.1"]
      attack.name: [ig]
      seed: {range: [0, 3]}

The grid expands (Cartesian product, in the order written) to cells; each cell is one experiment: capture
-> Observation file -> attack -> metrics (:func:`gradleak.experiment.run.run_cell`), and the sweep adds
MS-SSIM/LPIPS (via :func:`gradleak.metrics.score`) and patient re-identification against a gallery of the
attacked data set (:mod:`gradleak.metrics.reid`). With ``utility.enabled`` the federated utility run that
matches each cell's obfuscation is run once per obfuscation (cached), not once per cell.

The folder ``DIR`` holds ``sweep.yaml`` (the resolved spec), ``cells/<cell id>/`` (each cell's files,
renamed into place when complete), ``results.jsonl`` (one row per cell, key ``cell``), ``results.csv``
(and ``results.parquet`` when pyarrow is installed), ``reid/`` (galleries and embedders) and ``utility/``.
Rerunning skips the cells already done; cells that failed are retried. Killing a sweep at any point
(even with SIGKILL) loses at most the cells that were running, and its workers exit with it.

This module runs a sweep; the parts live beside it: :mod:`.spec` (reading and checking the spec),
:mod:`.grid` (cells), :mod:`.backends` (local processes, Ray), :mod:`.store` (``results.jsonl``, the typed
row, CSV/parquet) and :mod:`gradleak.metrics.reid` (galleries).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..metrics.reid import ReidContext, cell_reid, prepare_reid
from ..validation import dump_yaml, load_yaml
from .backends import LocalBackend, RayBackend
from .grid import Cell, check_cells, check_data, digest, expand, params_text
from .labels import obfuscation_label, setting_label
from .outputs import _jsonable, write_json, write_text
from .spec import SWEEP_FORMAT, SWEEP_SCHEMA, load_spec, normalize_obfuscation, spec_from_dict
from .store import ResultRow, ResultStore, read_utilities

log = logging.getLogger(__name__)

# execution options that may change between a run and its resumption
_EXECUTION_KEYS: tuple[str, ...] = ("gpus_per_cell",)


# --------------------------------------------------------------------------------------------- utility
def utility_run_id(key: str, k: int) -> str:
    """The folder of the ``k``-th seed of utility config ``key`` (the first keeps the bare key)."""
    return key if k == 0 else f"{key}-s{k}"


def utility_config(spec: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    """The utility run matching a cell: the sweep's utility config with the cell's data (unless the
    utility config names its own) and the cell's obfuscation, checked by the utility simulation."""
    ucfg = copy.deepcopy(spec["utility"]["config"])
    ucfg.setdefault("data", copy.deepcopy(cfg["data"]))
    cap = cfg["capture"]
    model = ucfg.setdefault("model", {})
    if isinstance(model, dict) and "arch" not in model:  # the attacked architecture, as captured
        model["arch"] = cap["arch"]
        for k in ("options", "mean", "std", "num_classes"):
            if cap.get(k) is not None:
                model.setdefault(k, copy.deepcopy(cap[k]))
    fed = ucfg.setdefault("federation", {})
    if isinstance(fed, dict) and "algorithm" not in fed:  # the attacked protocol
        fed["algorithm"] = cap["protocol"]["algorithm"]
    if isinstance(fed, dict):  # the sweep's own backend runs the tasks in parallel: no Ray inside each task
        fed.setdefault("engine", "local")
    ucfg["obfuscation"] = copy.deepcopy(cfg["capture"]["obfuscation"])
    ucfg.setdefault("name", f"{spec['name']}-utility")
    ucfg.pop("output_dir", None)
    ucfg.pop("threads", None)
    from .utility import from_dict

    checked = from_dict(ucfg, source="utility.config")
    checked.pop("threads", None)
    return checked


def _utility_done(path: Path) -> bool:
    """Whether a utility run's ``result.json`` is there and readable (a damaged one is run again)."""
    try:
        return isinstance(json.loads(path.read_text()), dict)
    except (OSError, ValueError):
        return False


def plan_utilities(spec: dict[str, Any], cells: list[Cell], folder: Path
                   ) -> tuple[dict[str, dict[str, Any]], dict[str, str | None]]:
    """The utility runs still to do (once per distinct utility config, i.e. per obfuscation, and per
    seed) by run id, and each cell's utility key (None without utility runs)."""
    utasks: dict[str, dict[str, Any]] = {}
    ukeys: dict[str, str | None] = {c.id: None for c in cells}
    if not spec["utility"]["enabled"]:
        return utasks, ukeys
    checked: dict[str, dict[str, Any]] = {}
    for c in cells:
        k = json.dumps(_jsonable([c.config["data"], c.config["capture"]["obfuscation"]]), sort_keys=True)
        if k not in checked:
            checked[k] = utility_config(spec, c.config)
        ucfg = checked[k]
        key = ukeys[c.id] = digest(ucfg, 10)
        for k_seed in range(int(spec["utility"]["seeds"])):
            sid = utility_run_id(key, k_seed)
            if sid in utasks or _utility_done(folder / "utility" / sid / "result.json"):
                continue
            ucfg_s = copy.deepcopy(ucfg)
            ucfg_s["seed"] = int(ucfg["seed"]) + k_seed
            ucfg_s["model"]["model_seed"] = int(ucfg["model"]["model_seed"]) + k_seed
            label = obfuscation_label(ucfg["obfuscation"]) + (f" (seed {ucfg_s['seed']})" if k_seed else "")
            utasks[sid] = {"kind": "utility", "id": sid, "config": ucfg_s, "label": label,
                           "device": str(ucfg.get("device", "cpu"))}
    return utasks, ukeys


# ------------------------------------------------------------------------------------------------- rows
def _epsilon(records: list[dict[str, Any]]) -> float | None:
    eps = [r.get("epsilon") for r in records if isinstance(r, dict) and r.get("epsilon") is not None]
    return float(eps[-1]) if eps else None


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _scored(m: dict[str, Any], reid: dict[str, Any] | None) -> dict[str, Any]:
    """The fields of a finished cell's row, from its metrics and re-identification."""
    keys = ("psnr", "ssim", "ms_ssim", "lpips", "lpips_note", "mse", "label_accuracy", "num_images")
    row: dict[str, Any] = {"metrics": {k: m[k] for k in keys if k in m}, "per_image": m.get("per_image", [])}
    for k, v in m.items():  # e.g. an attack's result before post-processing
        if (k != "metric_variants" and isinstance(v, dict) and {"psnr", "ssim"} <= set(v)
                and isinstance(v["psnr"], (int, float))):
            row["metrics"][k] = {kk: v[kk] for kk in ("psnr", "ssim", "ms_ssim") if kk in v}
    row["metric_variants"] = m.get("metric_variants", {})
    if m.get("baseline"):
        row["baseline"] = {k: v for k, v in m["baseline"].items() if k != "per_image"}
        row["gain_over_baseline"] = m.get("gain_over_baseline")
        raw = m.get("without_postprocessing")
        if isinstance(raw, dict) and raw.get("gain_over_baseline"):
            row["metrics"]["without_postprocessing"]["gain_over_baseline"] = raw["gain_over_baseline"]
    row.update(budget=m.get("budget"), converged=m.get("converged"), threat_model=m.get("threat_model", {}),
               reid=reid, bits=m.get("bits"), obfuscation=m.get("obfuscation", []))
    row["epsilon"] = _epsilon(row["obfuscation"])
    return row


def build_row(cell: Cell, result: dict[str, Any], reid: dict[str, Any] | None, ukey: str | None,
              backend: str) -> ResultRow:
    """The row of a cell from its task's result."""
    from ..attacks import canonical
    from .outputs import versions

    try:
        attack = canonical(cell.config["attack"]["name"])
    except UserError:
        attack = str(cell.config["attack"]["name"])
    row: dict[str, Any] = {"cell": cell.id, "index": cell.index, "status": result["status"],
                           "setting": setting_label(cell.config), "attack": attack, "params": cell.params}
    if result["status"] == "ok":
        row.update(_scored(result.get("metrics") or {}, reid))
    else:
        row["error"] = result.get("error")
    row["utility_key"] = ukey
    if result.get("attack"):
        row["attack_run"] = {k: v for k, v in result["attack"].items() if k != "seconds"}
    row["timings"] = {"cell_s": result.get("seconds"), "attack_s": (result.get("attack") or {}).get("seconds"),
                      "started": _iso(result.get("started")), "finished": _iso(result.get("finished"))}
    row.update(host=result.get("host"), backend=backend, versions=versions(), config=cell.config)
    return ResultRow.from_dict(_jsonable(row), f"cell {cell.id}")


# ------------------------------------------------------------------------------------------------ sweep
@dataclass
class SweepSummary:
    folder: Path
    cells: int
    ran: int
    skipped: int
    failed: list[tuple[str, str]]
    seconds: float


def _spec_for_compare(spec: dict[str, Any]) -> str:
    s = {k: v for k, v in spec.items() if k not in _EXECUTION_KEYS and k != "format"}
    return json.dumps(_jsonable(s), sort_keys=True)


def open_folder(folder: Path, spec: dict[str, Any]) -> Path:
    """Create (or reopen, for the same spec) the sweep's folder; write its ``sweep.yaml``."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} exists and is not a folder")
    spec_path = folder / "sweep.yaml"
    if spec_path.is_file():
        try:
            old = load_yaml(spec_path.read_text()) or {}
        except (yaml.YAMLError, UnicodeDecodeError):
            raise UserError(f"{spec_path}: not valid YAML; move the folder away or use another --out") from None
        if not isinstance(old, dict):
            raise UserError(f"{spec_path}: not a sweep spec; move the folder away or use another --out")
        if isinstance(old.get("utility"), dict):  # written before utility.seeds existed
            old["utility"].setdefault("seeds", SWEEP_SCHEMA["utility"]["seeds"])
        if _spec_for_compare(old) != _spec_for_compare({"format": SWEEP_FORMAT, **spec}):
            raise UserError(f"{folder} holds a different sweep (its sweep.yaml differs from this spec); "
                            f"use another --out to run this one")
    elif folder.exists() and any(folder.iterdir()):
        raise UserError(f"--out {folder} exists, is not empty and holds no sweep.yaml; use another folder")
    folder.mkdir(parents=True, exist_ok=True)
    write_text(spec_path, dump_yaml(_jsonable({"format": SWEEP_FORMAT, **spec})))
    (folder / "cells").mkdir(exist_ok=True)
    for leftover in (folder / "cells").glob(".*"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)
    return folder


def run_sweep(spec: dict[str, Any], out: str | Path, *, backend: str = "local", address: str | None = None,
              workers: int | None = None, progress: bool = True, source: str = "sweep") -> SweepSummary:
    """Run (or resume) ``spec`` into folder ``out``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the driver only bookkeeps and scores; the CPUs belong to the workers
    try:
        return _run_sweep(spec, out, backend=backend, address=address, workers=workers, progress=progress,
                          source=source)
    finally:
        torch.set_num_threads(threads)


def _run_sweep(spec, out, *, backend, address, workers, progress, source) -> SweepSummary:
    t0 = time.perf_counter()
    if backend not in ("local", "ray"):
        raise UserError(f"unknown backend '{backend}' (use local or ray)")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    cells = expand(spec, source)
    check_cells(cells)
    check_data(cells)
    sweep = _Sweep(spec, open_folder(Path(out), spec), cells, progress=progress)
    log.info(f"sweep '{spec['name']}': {len(cells)} cells, {len(sweep.done)} done, {len(sweep.todo)} to run "
              f"-> {sweep.folder}")
    sweep.execute(backend, address, workers)
    sweep.finish()
    return SweepSummary(folder=sweep.folder, cells=len(cells), ran=len(sweep.todo), skipped=len(sweep.done),
                        failed=sweep.failed, seconds=time.perf_counter() - t0)


class _Sweep:
    """One run of a sweep in its folder: what is done, what to run, and what to do as each task ends."""

    def __init__(self, spec: dict[str, Any], folder: Path, cells: list[Cell], *, progress: bool):
        self.spec, self.folder, self.cells, self.progress = spec, folder, cells, progress
        self.by_id = {c.id: c for c in cells}
        self.store = ResultStore(folder)
        self.done = {k: r for k, r in self._rows().items() if r.status == "ok"}
        self.store.rewrite([self.done[c.id] for c in cells if c.id in self.done])
        self.todo = [c for c in cells if c.id not in self.done]
        self.utasks, self.ukeys = plan_utilities(spec, cells, folder)
        for key in self.utasks:  # utility results that failed before are retried
            shutil.rmtree(folder / "utility" / f".{key}.partial", ignore_errors=True)
        self.failed: list[tuple[str, str]] = []
        self.contexts: dict[str, ReidContext] = {}
        self.bar: Any = None
        self.backend_name = "local"

    def _rows(self) -> dict[str, ResultRow]:
        """The rows of this sweep's cells: ``results.jsonl``, plus the rows of cells renamed into place
        whose row was not appended yet (their ``row.json``; a damaged one reruns the cell)."""
        try:
            rows = {k: r for k, r in self.store.read().items() if k in self.by_id}
        except UserError as e:
            raise UserError(f"{e}; move it away and rerun: the finished cells' row.json files restore it") from None
        for c in self.cells:
            rj = self.folder / "cells" / c.id / "row.json"
            if c.id not in rows and rj.is_file():
                try:
                    rows[c.id] = ResultRow.from_json(rj.read_text(), str(rj))
                except (UserError, OSError, UnicodeDecodeError):
                    pass
        return rows

    # ------------------------------------------------------------------------------ as tasks end
    def staging(self, task: dict[str, Any]) -> Path:
        base = self.folder / ("cells" if task["kind"] == "cell" else "utility")
        w = base / f".{task['id']}.partial"
        shutil.rmtree(w, ignore_errors=True)
        w.mkdir(parents=True)
        return w

    def _advance(self) -> None:
        self.bar.update(1)
        self.bar.set_postfix(failed=len(self.failed))

    def finish_utility(self, task: dict[str, Any], result: dict[str, Any], workdir: Path) -> None:
        write_json(workdir / "result.json", {**result, "config": task["config"], "label": task["label"]})
        final = self.folder / "utility" / task["id"]
        shutil.rmtree(final, ignore_errors=True)
        workdir.rename(final)
        if result["status"] != "ok":
            self.failed.append((f"utility {task['label']}", result.get("error", "")))
            (final / "result.json").rename(final / "failed.json")
        self._advance()

    def _reid_key(self, cell: Cell) -> str:
        r = self.spec["reid"]
        return digest({"data": cell.config["data"], "gallery_size": r["gallery_size"], "seed": r["seed"]})

    def finish_cell(self, task: dict[str, Any], result: dict[str, Any], workdir: Path) -> None:
        cell = self.by_id[task["id"]]
        reid = None
        if result["status"] == "ok" and self.spec["reid"]["enabled"]:
            try:
                reid = cell_reid(workdir, self.contexts[self._reid_key(cell)], list(self.spec["reid"]["distances"]),
                                 cell.config["data"])
            except Exception as e:  # noqa: BLE001 - recorded, like any failing step of a cell
                result = {**result, "status": "failed",
                          "error": f"re-identification: {type(e).__name__}: {' '.join(str(e).split())}"}
        row = build_row(cell, result, reid, self.ukeys[cell.id], self.backend_name)
        write_json(workdir / "row.json", row.as_dict())
        final = self.folder / "cells" / cell.id
        shutil.rmtree(final, ignore_errors=True)
        workdir.rename(final)
        self.store.append(row)
        if row.status != "ok":
            self.failed.append((f"cell {cell.id} ({params_text(cell.params)})", row.error or ""))
            log.info(f"cell {cell.id} failed: {row.error}")
        self._advance()

    # ------------------------------------------------------------------------------------ running
    def _classifier(self) -> Path | None:
        """The unprotected utility run's model, which ``reid.embedding: auto`` uses as embedder."""
        if not (self.spec["reid"]["enabled"] and self.spec["reid"]["embedding"] == "auto"):
            return None
        unprotected = [k for k, t in self.utasks.items() if not t["config"]["obfuscation"]] or \
            [self.ukeys[c.id] for c in self.cells if not c.config["capture"]["obfuscation"] and self.ukeys[c.id]]
        for key in unprotected:
            mp = self.folder / "utility" / str(key) / "run" / "model.pt"
            if mp.is_file():
                return mp
        return None

    def _prepare_reid(self) -> None:
        if not self.spec["reid"]["enabled"]:
            return
        classifier = self._classifier()
        for c in self.todo:
            k = self._reid_key(c)
            if k not in self.contexts:
                self.contexts[k] = prepare_reid(self.folder / "reid" / k, c.config["data"], self.spec["reid"],
                                                classifier)

    def execute(self, backend: str, address: str | None, workers: int | None) -> None:
        """Run the utility runs, then the cells, on ``backend``."""
        from tqdm import tqdm

        nworkers = workers or max(1, min(os.cpu_count() or 1, max(len(self.todo), len(self.utasks), 1)))
        self.bar = tqdm(total=len(self.todo) + len(self.utasks), desc="sweep", unit="task", disable=not self.progress,
                        file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
        try:
            if not (self.todo or self.utasks):
                return
            be = LocalBackend(nworkers) if backend == "local" else \
                RayBackend(address, workers, self.spec["gpus_per_cell"])
            self.backend_name = be.name
            if self.utasks:
                be.run(list(self.utasks.values()), self.staging, self.finish_utility)
            self._prepare_reid()
            if self.todo:
                be.run([{"kind": "cell", "id": c.id, "config": c.config, "device": c.device,
                         "keep_observation": self.spec["keep_observations"]} for c in self.todo],
                       self.staging, self.finish_cell)
        finally:
            self.bar.close()

    def finish(self) -> None:
        """The final tables: rows in grid order, failed ones included (they are retried on the next run)."""
        rows = self._rows()
        ordered = [rows[c.id] for c in self.cells if c.id in rows]
        self.store.rewrite(ordered)
        self.store.export_tables(ordered, read_utilities(self.folder))


__all__ = ["SWEEP_SCHEMA", "Cell", "load_spec", "spec_from_dict", "expand", "check_cells", "run_sweep",
           "normalize_obfuscation", "setting_label", "ResultStore", "utility_config", "SweepSummary"]
