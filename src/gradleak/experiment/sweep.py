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
(even with SIGKILL) loses at most the cells that were running.
"""

from __future__ import annotations

import copy
import csv
import hashlib
import io
import itertools
import json
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml

from .. import obfuscation
from ..errors import UserError
from ..files import atomic_path
from .labels import obfuscation_label, setting_label
from . import config as config_mod
from .outputs import _jsonable, write_json, write_text
from .spec import SWEEP_FORMAT, SWEEP_SCHEMA, load_spec, normalize_obfuscation, spec_from_dict
from .store import ResultStore, read_utilities

# execution options that may change between a run and its resumption
_EXECUTION_KEYS: tuple[str, ...] = ("gpus_per_cell",)


# ------------------------------------------------------------------------------------------------ cells
@dataclass
class Cell:
    id: str
    index: int
    params: dict[str, Any]  # the grid values of this cell, by dotted key
    config: dict[str, Any]  # the full experiment config

    @property
    def device(self) -> str:
        return str(self.config["attack"]["device"])


def _set(cfg: dict[str, Any], dotted: str, value: Any) -> None:
    node = cfg
    parts = dotted.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = copy.deepcopy(value)


def digest(obj: Any, n: int = 10) -> str:
    return hashlib.sha1(json.dumps(_jsonable(obj), sort_keys=True).encode()).hexdigest()[:n]


def expand(spec: dict[str, Any], source: str = "sweep") -> list[Cell]:
    """The cells of ``spec``'s grid (Cartesian product in the order the keys are written)."""
    grid = spec["grid"]
    keys = list(grid)
    cells = []
    for index, combo in enumerate(itertools.product(*(grid[k] for k in keys))):
        cfg = copy.deepcopy(spec["base"])
        params = dict(zip(keys, combo))
        for k, v in params.items():
            _set(cfg, k, v)
        cfg["name"] = spec["name"]
        cfg = config_mod.from_dict(cfg, source=f"{source} (cell {index})")
        cfg.pop("output_dir", None)
        cells.append(Cell(id=f"{index:04d}-{digest(cfg, 8)}", index=index, params=params, config=cfg))
    return cells


def check_cells(cells: list[Cell]) -> None:
    """Fail early, before any work, on names a cell would only trip over later."""
    from ..attacks import canonical, resolve_settings

    seen: set[str] = set()
    for c in cells:
        att = c.config["attack"]
        key = json.dumps([att["name"], att["settings"]], sort_keys=True, default=str)
        if key not in seen:
            seen.add(key)
            try:
                resolve_settings(canonical(att["name"]), att["settings"])
            except UserError as e:
                raise UserError(f"cell {c.index} ({_params_text(c.params)}): {e}") from None
        for spec in c.config["capture"]["obfuscation"]:
            try:
                obfuscation.resolve(spec)
            except UserError as e:
                raise UserError(f"cell {c.index} ({_params_text(c.params)}): {e}") from None


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={json.dumps(_jsonable(v))}" for k, v in params.items()) or "base"


# ---------------------------------------------------------------------------------------- tasks (worker)
def _set_threads(n: int) -> None:
    import torch
    torch.set_num_threads(max(1, int(n)))


def execute_task(task: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one task (a cell or a utility run) into ``workdir``. Never raises: failures are results."""
    from .run import Log, run_cell

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _set_threads(task.get("threads", 1))
    started = time.time()
    t0 = time.perf_counter()
    log = Log(None)
    result: dict[str, Any] = {"kind": task["kind"], "id": task["id"], "started": started,
                              "host": socket.gethostname()}
    try:
        if task["kind"] == "cell":
            cfg = task["config"]
            write_text(workdir / "config.yaml", config_mod.dump(cfg))
            metrics = run_cell(cfg, workdir, log=log, progress=False)
            if not task.get("keep_observation", False):
                (workdir / "observation.pt").unlink(missing_ok=True)
            summary = json.loads((workdir / "attack.json").read_text())
            result.update(status="ok", metrics=metrics,
                          attack={k: summary.get(k) for k in ("iterations", "seconds", "seconds_per_iteration",
                                                              "converged", "pipeline", "final_loss", "settings")})
        elif task["kind"] == "utility":
            from .utility import run_utility

            cfg = {**task["config"], "threads": int(task.get("threads", 1))}
            out = run_utility(cfg, progress=False, folder=workdir / "run")
            result.update(status="ok", utility=_jsonable({k: out[k] for k in _UTILITY_KEYS if k in out}))
        else:  # pragma: no cover - a bug
            raise ValueError(f"unknown task kind {task['kind']!r}")
    except BaseException as e:  # noqa: BLE001 - a failing cell is recorded and the sweep goes on
        if isinstance(e, KeyboardInterrupt):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        result.update(status="failed", error=f"{type(e).__name__}: {msg}",
                      traceback=traceback.format_exc(limit=20))
        log(f"failed: {type(e).__name__}: {msg}")
    result["seconds"] = round(time.perf_counter() - t0, 3)
    result["finished"] = time.time()
    write_text(workdir / "log.txt", log.text() + (result.get("traceback", "") or ""))
    return _jsonable(result)


def _child_main(task: dict[str, Any], workdir: str, result_path: str) -> None:
    """Entry point of a local worker process."""
    _die_with_parent()
    result = execute_task(task, Path(workdir))
    write_json(Path(result_path), result)


def _die_with_parent() -> None:
    """Linux: have the kernel kill this process when its parent dies (e.g. the sweep got SIGKILL)."""
    if sys.platform != "linux":
        return
    try:
        import ctypes
        import signal
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() == 1:
            os._exit(1)
    except OSError:
        pass


def _ray_task(task: dict[str, Any]) -> dict[str, Any]:
    """A task on a Ray worker: run in a temporary folder, return the result and the files as bytes, so
    that workers need no shared file system with the driver."""
    with tempfile.TemporaryDirectory(prefix="gradleak-task-") as tmp:
        result = execute_task(task, Path(tmp))
        files = {}
        for p in Path(tmp).rglob("*"):
            if p.is_file():
                files[str(p.relative_to(tmp))] = p.read_bytes()
    return {"result": result, "files": files}


# ---------------------------------------------------------------------------------------------- backends
class LocalBackend:
    """One worker process per task (forked from a preloaded server), at most ``workers`` at a time."""

    name = "local"

    def __init__(self, workers: int):
        import multiprocessing as mp
        self.workers = max(1, int(workers))
        self.threads = max(1, (os.cpu_count() or 1) // self.workers)
        method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        self.ctx = mp.get_context(method)
        if method == "forkserver":
            # torch.func imports torch._dynamo on first use (seconds): import it once, in the server
            self.ctx.set_forkserver_preload(["torch._dynamo", "gradleak.experiment.sweep", "gradleak.experiment.run",
                                             "gradleak.attacks"])

    def run(self, tasks: list[dict[str, Any]], staging: Callable[[dict[str, Any]], Path],
            done: Callable[[dict[str, Any], dict[str, Any], Path], None]) -> None:
        from multiprocessing.connection import wait

        queue = list(tasks)
        running: dict[Any, tuple[Any, dict[str, Any], Path, Path]] = {}
        try:
            while queue or running:
                while queue and len(running) < self.workers:
                    task = {**queue.pop(0), "threads": self.threads}
                    workdir = staging(task)
                    result_path = workdir.parent / f".{workdir.name}.result.json"
                    result_path.unlink(missing_ok=True)
                    p = self.ctx.Process(target=_child_main, args=(task, str(workdir), str(result_path)),
                                         daemon=True)
                    p.start()
                    running[p.sentinel] = (p, task, workdir, result_path)
                for sentinel in wait(list(running), timeout=1.0):
                    p, task, workdir, result_path = running.pop(sentinel)
                    p.join()
                    if result_path.is_file():
                        result = json.loads(result_path.read_text())
                        result_path.unlink()
                    else:
                        result = {"kind": task["kind"], "id": task["id"], "status": "failed",
                                  "error": f"worker process died (exit code {p.exitcode})", "seconds": None}
                    done(task, result, workdir)
        finally:
            for p, *_ in running.values():
                p.kill()
                p.join()


class RayBackend:
    """Tasks as Ray tasks on an existing cluster (``address``) or a local Ray started here."""

    name = "ray"

    def __init__(self, address: str | None, workers: int | None, gpus_per_cell: float):
        try:
            import ray
        except ImportError:
            raise UserError("the ray backend needs Ray: pip install 'gradleak[ray]'") from None
        self.ray = ray
        self.gpus_per_cell = float(gpus_per_cell)
        self.started_here = not ray.is_initialized()
        if self.started_here:
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                                      "configure_logging": False}
            if address:
                kwargs["address"] = address
            elif workers:
                kwargs["num_cpus"] = int(workers)
            pythonpath = os.environ.get("PYTHONPATH")
            if pythonpath and not address:
                kwargs["runtime_env"] = {"env_vars": {"PYTHONPATH": pythonpath}}
            try:
                ray.init(**kwargs)
            except Exception as e:  # noqa: BLE001 - no cluster at that address, etc.
                where = f" at {address}" if address else ""
                raise UserError(f"could not connect to Ray{where}: {' '.join(str(e).split())[:300]}") from None

    def run(self, tasks, staging, done) -> None:
        ray = self.ray
        remote = ray.remote(_ray_task)
        pending = {}
        if self.gpus_per_cell > 0 and any(t.get("device", "cpu").startswith("cuda") for t in tasks):
            have = float(ray.cluster_resources().get("GPU", 0))
            if have < self.gpus_per_cell:
                if self.started_here:
                    ray.shutdown()
                raise UserError(f"cells run on cuda and ask Ray for {self.gpus_per_cell:g} GPU each, but the "
                                f"Ray cluster has {have:g} GPUs")
        for task in tasks:
            gpus = self.gpus_per_cell if task.get("device", "cpu").startswith("cuda") else 0
            ref = remote.options(num_cpus=1, num_gpus=gpus, max_retries=0).remote({**task, "threads": 1})
            pending[ref] = task
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    task = pending.pop(ref)
                    workdir = staging(task)
                    try:
                        out = ray.get(ref)
                        for rel, data in out["files"].items():
                            path = workdir / rel
                            path.parent.mkdir(parents=True, exist_ok=True)
                            path.write_bytes(data)
                        result = out["result"]
                    except Exception as e:  # noqa: BLE001 - the worker died; record and go on
                        result = {"kind": task["kind"], "id": task["id"], "status": "failed",
                                  "error": f"Ray task failed: {type(e).__name__}: {' '.join(str(e).split())[:300]}",
                                  "seconds": None}
                    done(task, result, workdir)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if self.started_here:
                ray.shutdown()


# ------------------------------------------------------------------------------------------------ re-id
@dataclass
class ReidContext:
    key: str
    gallery_path: Path
    embedder_path: Path | None
    embedder_kind: str | None
    description: dict[str, Any] = field(default_factory=dict)


def _data_key(data: dict[str, Any], r: dict[str, Any]) -> str:
    return digest({"data": data, "gallery_size": r["gallery_size"], "seed": r["seed"]})


def prepare_reid(folder: Path, data: dict[str, Any], r: dict[str, Any], classifier: Path | None,
                 echo: Callable[[str], None]) -> ReidContext:
    """Build (or reuse) the gallery of one data set and its learned embedding."""
    from ..data import load_dataset
    from ..metrics.reid import Gallery, train_autoencoder

    key = _data_key(data, r)
    d = folder / "reid" / key
    gpath = d / "gallery.npz"
    if not gpath.is_file():
        ds = load_dataset(data)
        n = len(ds)
        if n <= r["gallery_size"]:
            idx = list(range(n))
        else:
            idx = sorted(int(i) for i in np.random.default_rng(r["seed"]).choice(n, r["gallery_size"],
                                                                                  replace=False))
        echo(f"re-identification gallery: {len(idx)} of {n} images of {ds.describe().get('source')}")
        b = ds.batch(idx)
        Gallery(b.images, b.patient_ids, b.labels, b.names, idx).save(gpath)
        write_json(d / "gallery.json", {"data": data, "data_description": ds.describe(), "images": len(idx),
                                        "patients": len(set(b.patient_ids)), "data_set_images": n})
    emb = str(r["embedding"])
    kind, epath = None, None
    if "embedding" in r["distances"] and emb != "none":
        if emb.startswith("classifier:"):
            kind, epath = "classifier", Path(emb.split(":", 1)[1])
        elif emb == "auto" and classifier is not None:
            kind, epath = "classifier", classifier
        else:
            kind, epath = "autoencoder", d / "autoencoder.pt"
            if not epath.is_file():
                echo("training the re-identification autoencoder on the gallery ...")
                g = Gallery.load(gpath)
                train_autoencoder(g.images, seed=r["seed"], steps=r["autoencoder_steps"]).save(epath)
    desc = json.loads((d / "gallery.json").read_text())
    return ReidContext(key, gpath, epath, kind, desc)


_EMBEDDERS: dict[str, Any] = {}


def _embedder(ctx: ReidContext):
    from ..metrics.reid import AutoencoderEmbedder, ClassifierEmbedder

    if ctx.embedder_path is None:
        return None
    k = str(ctx.embedder_path)
    if k not in _EMBEDDERS:
        _EMBEDDERS[k] = (ClassifierEmbedder.from_file(ctx.embedder_path) if ctx.embedder_kind == "classifier"
                         else AutoencoderEmbedder.load(ctx.embedder_path))
    return _EMBEDDERS[k]


_DATASETS: dict[str, Any] = {}


def cell_reid(folder: Path, ctx: ReidContext, distances: list[str], data: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Re-identification of a finished cell's reconstructions against its gallery.

    The attacked images and every other image of the attacked patients join the gallery when its seeded
    subset missed them: patient re-identification searches it with the attacked image left out, so the
    patients' other images must be there to be found."""
    import torch

    from ..capture import load_truth
    from ..data import load_dataset
    from ..metrics.reid import Gallery, reidentify

    truth = load_truth(folder / "truth.npz")
    with np.load(folder / "reconstruction.npz") as z:
        rec = torch.from_numpy(z["images"])
    metrics = json.loads((folder / "metrics.json").read_text())
    perm = [p["paired_reconstruction"] for p in metrics["per_image"]]
    gallery = Gallery.load(ctx.gallery_path)
    have = set(gallery.indices)
    add = [i for i in truth.indices if i not in have]
    if data is not None:
        key = json.dumps(_jsonable(data), sort_keys=True)
        if key not in _DATASETS:
            _DATASETS[key] = load_dataset(data)
        ds = _DATASETS[key]
        attacked = {str(p) for p in truth.patient_ids}
        add = sorted(set(add) | {i for i, p in enumerate(ds.patient_ids) if str(p) in attacked and i not in have})
        if add:
            b = ds.batch(add)
            gallery = Gallery(torch.cat([gallery.images, b.images]), gallery.patient_ids + list(b.patient_ids),
                              (torch.cat([gallery.labels, b.labels]) if gallery.labels is not None else None),
                              gallery.names + list(b.names), gallery.indices + list(add))
    elif add:  # attacked images outside the gallery subset join it
        missing = [k for k, i in enumerate(truth.indices) if i not in have]
        gallery = Gallery(torch.cat([gallery.images, truth.images[missing]]),
                          gallery.patient_ids + [truth.patient_ids[k] for k in missing],
                          (torch.cat([gallery.labels, truth.labels[missing]]) if gallery.labels is not None
                           else None),
                          gallery.names + [truth.names[k] for k in missing],
                          gallery.indices + [truth.indices[k] for k in missing])
    gallery.description = {"data": ctx.description.get("data_description", {}).get("source")}
    return reidentify(rec[perm], gallery.position(truth.indices), gallery, distances=distances,
                      embedder=_embedder(ctx))


# ------------------------------------------------------------------------------------------------- rows
def _epsilon(records: list[dict[str, Any]]) -> float | None:
    eps = [r.get("epsilon") for r in records if isinstance(r, dict) and r.get("epsilon") is not None]
    return float(eps[-1]) if eps else None


#: What a sweep keeps of a utility run's result (the full ``utility.json`` stays in its folder).
_UTILITY_KEYS = ("final", "best", "best_round", "rounds_run", "bits_per_round", "bits_per_update",
                 "dense_bits_per_update", "epsilon", "delta", "threat_model", "metric_variants", "model",
                 "protocol", "seconds")


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
    ucfg["obfuscation"] = copy.deepcopy(cfg["capture"]["obfuscation"])
    ucfg.setdefault("name", f"{spec['name']}-utility")
    ucfg.pop("output_dir", None)
    ucfg.pop("threads", None)
    from .utility import from_dict

    checked = from_dict(ucfg, source="utility.config")
    checked.pop("threads", None)
    return checked


def _row(cell: Cell, result: dict[str, Any], reid: dict[str, Any] | None, ukey: str | None,
         backend: str) -> dict[str, Any]:
    from ..attacks import canonical
    from .outputs import versions

    m = result.get("metrics") or {}
    try:
        attack = canonical(cell.config["attack"]["name"])
    except UserError:
        attack = str(cell.config["attack"]["name"])
    row: dict[str, Any] = {
        "cell": cell.id, "index": cell.index, "status": result["status"],
        "setting": setting_label(cell.config), "attack": attack,
        "params": cell.params,
    }
    if result["status"] == "ok":
        keys = ("psnr", "ssim", "ms_ssim", "lpips", "lpips_note", "mse", "label_accuracy", "num_images")
        row["metrics"] = {k: m[k] for k in keys if k in m}
        row["per_image"] = m.get("per_image", [])
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
        row["budget"] = m.get("budget")
        row["converged"] = m.get("converged")
        row["threat_model"] = m.get("threat_model", {})
        row["reid"] = reid
        row["bits"] = m.get("bits")
        row["obfuscation"] = m.get("obfuscation", [])
        row["epsilon"] = _epsilon(row["obfuscation"])
    else:
        row["error"] = result.get("error")
    row["utility_key"] = ukey
    if result.get("attack"):
        row["attack_run"] = {k: v for k, v in result["attack"].items() if k != "seconds"}
    row["timings"] = {"cell_s": result.get("seconds"), "attack_s": (result.get("attack") or {}).get("seconds"),
                      "started": _iso(result.get("started")),
                      "finished": _iso(result.get("finished"))}
    row["host"] = result.get("host")
    row["backend"] = backend
    row["versions"] = versions()
    row["config"] = cell.config
    return row


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    key = prefix[:-1]
    if isinstance(d, (list, tuple)):
        out[key] = json.dumps(_jsonable(d))
    else:
        out[key] = d
    return out


def flat_row(row: dict[str, Any], utility: dict[str, Any] | None = None) -> dict[str, Any]:
    """A row for CSV/parquet: nested keys dotted, lists as JSON, per-image details left out."""
    keep = {k: v for k, v in row.items() if k not in ("per_image", "config", "obfuscation", "metric_variants")}
    base = keep.pop("baseline", None)
    if base:
        keep["baseline"] = {k: base.get(k) for k in ("psnr", "ssim", "ms_ssim")}
    gain = keep.pop("gain_over_baseline", None)
    if gain:
        keep["gain_over_baseline"] = {k: gain.get(k) for k in ("psnr_db", "ssim", "ssim_skill")}
    reid = keep.pop("reid", None) or {}
    flat = _flatten(keep)
    for dist, r in (reid.get("by_distance") or {}).items():
        for k in ("top1", "top5", "iip", "median_true_image_rank", "note"):
            if k in r:
                flat[f"reid.{dist}.{k}"] = r[k]
    if reid.get("strongest"):
        for k, v in reid["strongest"].items():
            flat[f"reid.strongest.{k}"] = v
    if reid:
        flat["reid.gallery_images"] = reid.get("gallery", {}).get("images")
        flat["reid.chance_top1"] = reid.get("chance_top1")
        flat["reid.chance_top5"] = reid.get("chance_top5")
        flat["reid.with_other_images"] = reid.get("num_with_other_images")
    if utility:
        for k, v in (utility.get("final") or {}).items():
            flat[f"utility.{k}"] = v
        for k in ("bits_per_round", "epsilon"):
            if k in utility:
                flat[f"utility.{k}"] = utility[k] if not isinstance(utility[k], (list, dict)) else json.dumps(
                    _jsonable(utility[k]))
    flat["config"] = json.dumps(_jsonable(row.get("config")), sort_keys=True)
    return flat


def export_tables(folder: Path, rows: list[dict[str, Any]], utilities: dict[str, dict[str, Any]]) -> list[Path]:
    flats = [flat_row(r, utilities.get(r.get("utility_key") or "")) for r in rows]
    columns: list[str] = []
    for f in flats:
        for k in f:
            if k not in columns:
                columns.append(k)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for f in flats:
        w.writerow({k: ("" if f.get(k) is None else f.get(k)) for k in columns})
    written = [write_text(folder / "results.csv", buf.getvalue())]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return written
    cols = {}
    for k in columns:
        vals = [f.get(k) for f in flats]
        kinds = {type(v) for v in vals if v is not None}
        if kinds and not kinds <= {int, float} and not kinds <= {str} and not kinds <= {bool}:
            vals = [None if v is None else str(v) for v in vals]
        elif kinds and kinds <= {int, float} and float in kinds:
            vals = [None if v is None else float(v) for v in vals]
        cols[k] = vals
    with atomic_path(folder / "results.parquet", suffix=".parquet") as tmp:
        pq.write_table(pa.table(cols), tmp)
    written.append(folder / "results.parquet")
    return written


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


def run_sweep(spec: dict[str, Any], out: str | Path, *, backend: str = "local", address: str | None = None,
              workers: int | None = None, progress: bool = True, echo: Callable[[str], None] | None = print,
              source: str = "sweep") -> SweepSummary:
    """Run (or resume) ``spec`` into folder ``out``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the driver only bookkeeps and scores; the CPUs belong to the workers
    try:
        return _run_sweep(spec, out, backend=backend, address=address, workers=workers, progress=progress,
                          echo=echo, source=source)
    finally:
        torch.set_num_threads(threads)


def _run_sweep(spec, out, *, backend, address, workers, progress, echo, source) -> SweepSummary:
    from tqdm import tqdm

    say = echo or (lambda _m: None)
    t0 = time.perf_counter()
    folder = Path(out)
    if backend not in ("local", "ray"):
        raise UserError(f"unknown backend '{backend}' (use local or ray)")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    cells = expand(spec, source)
    check_cells(cells)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} exists and is not a folder")
    spec_path = folder / "sweep.yaml"
    if spec_path.is_file():
        try:
            old = yaml.safe_load(spec_path.read_text()) or {}
        except yaml.YAMLError:
            raise UserError(f"{spec_path}: not valid YAML; move the folder away or use another --out") from None
        if isinstance(old.get("utility"), dict):  # written before utility.seeds existed
            old["utility"].setdefault("seeds", SWEEP_SCHEMA["utility"]["seeds"])
        if _spec_for_compare(old) != _spec_for_compare({"format": SWEEP_FORMAT, **spec}):
            raise UserError(f"{folder} holds a different sweep (its sweep.yaml differs from this spec); "
                            f"use another --out to run this one")
    elif folder.exists() and any(folder.iterdir()):
        raise UserError(f"--out {folder} exists, is not empty and holds no sweep.yaml; use another folder")
    folder.mkdir(parents=True, exist_ok=True)
    write_text(spec_path, yaml.safe_dump(_jsonable({"format": SWEEP_FORMAT, **spec}), sort_keys=False))
    (folder / "cells").mkdir(exist_ok=True)
    for leftover in (folder / "cells").glob(".*"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)

    # what is done already: results.jsonl, plus rows of cells renamed into place but not yet appended
    store = ResultStore(folder)
    by_id = {c.id: c for c in cells}
    rows = {k: v for k, v in store.read().items() if k in by_id}
    for c in cells:
        rj = folder / "cells" / c.id / "row.json"
        if c.id not in rows and rj.is_file():
            try:
                rows[c.id] = json.loads(rj.read_text())
            except json.JSONDecodeError:
                pass
    done = {k: v for k, v in rows.items() if v.get("status") == "ok"}
    store.rewrite([done[c.id] for c in cells if c.id in done])
    todo = [c for c in cells if c.id not in done]
    say(f"sweep '{spec['name']}': {len(cells)} cells, {len(done)} done, {len(todo)} to run -> {folder}")

    # utility runs, once per distinct utility config (i.e. per obfuscation)
    utasks: dict[str, dict[str, Any]] = {}
    ukeys: dict[str, str | None] = {c.id: None for c in cells}
    if spec["utility"]["enabled"]:
        checked: dict[str, dict[str, Any]] = {}
        for c in cells:
            k = json.dumps(_jsonable([c.config["data"], c.config["capture"]["obfuscation"]]), sort_keys=True)
            if k not in checked:
                checked[k] = utility_config(spec, c.config)
            ucfg = checked[k]
            key = digest(ucfg, 10)
            ukeys[c.id] = key
            for k_seed in range(int(spec["utility"]["seeds"])):
                sid = utility_run_id(key, k_seed)
                if not (folder / "utility" / sid / "result.json").is_file() and sid not in utasks:
                    ucfg_s = copy.deepcopy(ucfg)
                    ucfg_s["seed"] = int(ucfg["seed"]) + k_seed
                    ucfg_s["model"]["model_seed"] = int(ucfg["model"]["model_seed"]) + k_seed
                    utasks[sid] = {"kind": "utility", "id": sid, "config": ucfg_s,
                                   "label": obfuscation_label(ucfg["obfuscation"]) + (f" (seed {ucfg_s['seed']})"
                                                                                      if k_seed else ""),
                                   "device": str(ucfg.get("device", "cpu"))}
    # utility results that failed before are retried
    for key in list(utasks):
        shutil.rmtree(folder / "utility" / f".{key}.partial", ignore_errors=True)

    nworkers = workers or max(1, min(os.cpu_count() or 1, max(len(todo), len(utasks), 1)))
    bar = tqdm(total=len(todo) + len(utasks), desc="sweep", unit="task", disable=not progress,
               file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
    failed: list[tuple[str, str]] = []
    be = None
    try:
        if todo or utasks:
            be = (LocalBackend(nworkers) if backend == "local"
                  else RayBackend(address, workers, spec["gpus_per_cell"]))

        def staging(task: dict[str, Any]) -> Path:
            base = folder / ("cells" if task["kind"] == "cell" else "utility")
            w = base / f".{task['id']}.partial"
            shutil.rmtree(w, ignore_errors=True)
            w.mkdir(parents=True)
            return w

        def finish_utility(task, result, workdir: Path) -> None:
            write_json(workdir / "result.json", {**result, "config": task["config"], "label": task["label"]})
            final = folder / "utility" / task["id"]
            shutil.rmtree(final, ignore_errors=True)
            workdir.rename(final)
            if result["status"] != "ok":
                failed.append((f"utility {task['label']}", result.get("error", "")))
                (final / "result.json").rename(final / "failed.json")
            bar.update(1)
            bar.set_postfix(failed=len(failed))

        if utasks:
            be.run(list(utasks.values()), staging, finish_utility)

        classifier = None
        if spec["reid"]["enabled"] and spec["reid"]["embedding"] == "auto":
            unprotected = [k for k, t in utasks.items() if not t["config"]["obfuscation"]] or \
                [ukeys[c.id] for c in cells if not c.config["capture"]["obfuscation"] and ukeys[c.id]]
            for key in unprotected:
                mp = folder / "utility" / str(key) / "run" / "model.pt"
                if mp.is_file():
                    classifier = mp
                    break
        contexts: dict[str, ReidContext] = {}
        if spec["reid"]["enabled"]:
            for c in todo:
                k = _data_key(c.config["data"], spec["reid"])
                if k not in contexts:
                    contexts[k] = prepare_reid(folder, c.config["data"], spec["reid"], classifier,
                                               lambda m: (bar.write(m) if progress else say(m)))

        def finish_cell(task, result, workdir: Path) -> None:
            cell = by_id[task["id"]]
            reid = None
            if result["status"] == "ok" and spec["reid"]["enabled"]:
                try:
                    ctx = contexts[_data_key(cell.config["data"], spec["reid"])]
                    reid = cell_reid(workdir, ctx, list(spec["reid"]["distances"]), cell.config["data"])
                except Exception as e:  # noqa: BLE001 - recorded, like any failing step of a cell
                    result = {**result, "status": "failed",
                              "error": f"re-identification: {type(e).__name__}: {' '.join(str(e).split())}"}
            row = _row(cell, result, reid, ukeys[cell.id], be.name if be else backend)
            write_json(workdir / "row.json", row)
            final = folder / "cells" / cell.id
            shutil.rmtree(final, ignore_errors=True)
            workdir.rename(final)
            store.append(row)
            if row["status"] != "ok":
                failed.append((f"cell {cell.id} ({_params_text(cell.params)})", row.get("error", "")))
                bar.write(f"cell {cell.id} failed: {row.get('error')}") if progress else say(
                    f"cell {cell.id} failed: {row.get('error')}")
            bar.update(1)
            bar.set_postfix(failed=len(failed))

        if todo:
            tasks = [{"kind": "cell", "id": c.id, "config": c.config, "device": c.device,
                      "keep_observation": spec["keep_observations"]} for c in todo]
            be.run(tasks, staging, finish_cell)
    finally:
        bar.close()

    # final tables: rows in grid order, failed ones included (they are dropped and retried on the next run)
    rows = {**{k: v for k, v in store.read().items() if k in by_id}}
    for c in cells:
        rj = folder / "cells" / c.id / "row.json"
        if c.id not in rows and rj.is_file():
            rows[c.id] = json.loads(rj.read_text())
    ordered = [rows[c.id] for c in cells if c.id in rows]
    utilities = read_utilities(folder)
    store.rewrite(ordered)
    export_tables(folder, ordered, utilities)
    return SweepSummary(folder=folder, cells=len(cells), ran=len(todo), skipped=len(done), failed=failed,
                        seconds=time.perf_counter() - t0)


__all__ = ["SWEEP_SCHEMA", "Cell", "load_spec", "spec_from_dict", "expand", "check_cells", "run_sweep",
           "normalize_obfuscation", "setting_label", "flat_row", "ResultStore"]
