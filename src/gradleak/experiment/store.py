"""The result store of a sweep: ``results.jsonl``, one :class:`ResultRow` per cell, and its CSV/parquet
export; and the readers of what the report shows (a sweep's rows, one experiment's or attack's
``metrics.json``, the utility runs).

A damaged file is a :class:`~gradleak.errors.UserError` that names it (and the line, for
``results.jsonl``), never a traceback and never silently skipped; the one exception is a last line cut
short (a sweep killed while appending), which is left out: the cell's ``row.json`` restores it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator

from ..errors import UserError
from ..files import atomic_path
from .labels import setting_label
from .outputs import _jsonable, write_text

Number = int | float


class ResultRow(BaseModel):
    """One line of ``results.jsonl``: one cell of a sweep (or the row of one experiment folder).

    Nested values stay plain dicts and lists. Fields absent from a row stay absent (:meth:`as_dict` gives
    back exactly the keys it was made of, in the file's order), and unknown keys are kept."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True)

    cell: str
    index: int | None = None
    status: Literal["ok", "failed"]
    setting: str | None = None
    attack: str | None = None
    params: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    per_image: list[Any] | None = None
    metric_variants: dict[str, Any] | None = None
    baseline: dict[str, Any] | None = None
    gain_over_baseline: dict[str, Any] | None = None
    budget: dict[str, Any] | None = None
    converged: bool | None = None
    threat_model: dict[str, Any] | None = None
    reid: dict[str, Any] | None = None
    bits: Number | None = None
    obfuscation: list[Any] | None = None
    epsilon: Number | None = None
    error: str | None = None
    utility_key: str | None = None
    attack_run: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    host: str | None = None
    backend: str | None = None
    versions: dict[str, Any] | None = None
    config: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _complete_when_ok(self) -> "ResultRow":
        """A finished cell's row says what it is (index, setting, attack) and what it scored."""
        if self.status != "ok":
            return self
        missing = [k for k in ("index", "setting", "attack") if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a row with status 'ok' needs {', '.join(missing)}")
        m = self.metrics or {}
        if not all(isinstance(m.get(k), (int, float)) and not isinstance(m.get(k), bool) for k in ("psnr", "ssim")):
            raise ValueError("a row with status 'ok' needs metrics with a number for psnr and ssim")
        return self

    @classmethod
    def from_dict(cls, data: Any, where: str) -> "ResultRow":
        """Validate a row; a damaged one is a :class:`UserError` that starts with ``where``."""
        if not isinstance(data, dict):
            raise UserError(f"{where}: a result row is a JSON object, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            err = e.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise UserError(f"{where}: not a result row ({loc + ': ' if loc else ''}"
                            f"{err['msg'].removeprefix('Value error, ')})") from None

    @classmethod
    def from_json(cls, text: str, where: str) -> "ResultRow":
        """Parse one line of ``results.jsonl`` (or a cell's ``row.json``)."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise UserError(f"{where}: not JSON ({getattr(e, 'msg', type(e).__name__)})") from None
        return cls.from_dict(data, where)

    def as_dict(self) -> dict[str, Any]:
        """The row as the dict it was written from (a new dict each call)."""
        return self.model_dump(exclude_unset=True)

    def to_json(self) -> str:
        """One line of ``results.jsonl`` (without the newline)."""
        return json.dumps(_jsonable(self.as_dict()))

    def flat_row(self, utility: dict[str, Any] | None = None) -> dict[str, Any]:
        """The row for CSV/parquet: nested keys dotted, lists as JSON, per-image details left out, and
        the final metrics of its utility run (``utility``) when there is one."""
        row = self.as_dict()
        keep = {k: v for k, v in row.items() if k not in ("per_image", "config", "obfuscation", "metric_variants")}
        base = keep.pop("baseline", None)
        if base:
            keep["baseline"] = {k: base.get(k) for k in ("psnr", "ssim", "ms_ssim")}
        gain = keep.pop("gain_over_baseline", None)
        if gain:
            keep["gain_over_baseline"] = {k: gain.get(k) for k in ("psnr_db", "ssim", "ssim_skill")}
        reid = keep.pop("reid", None) or {}
        flat = _flatten(keep)
        flat.update(_flat_reid(reid))
        if utility:
            for k, v in (utility.get("final") or {}).items():
                flat[f"utility.{k}"] = v
            for k in ("bits_per_round", "epsilon"):
                if k in utility:
                    v = utility[k]
                    flat[f"utility.{k}"] = json.dumps(_jsonable(v)) if isinstance(v, (list, dict)) else v
        flat["config"] = json.dumps(_jsonable(row.get("config")), sort_keys=True)
        return flat


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    out[prefix[:-1]] = json.dumps(_jsonable(d)) if isinstance(d, (list, tuple)) else d
    return out


def _flat_reid(reid: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for dist, r in (reid.get("by_distance") or {}).items():
        for k in ("top1", "top5", "iip", "median_true_image_rank", "note"):
            if k in r:
                flat[f"reid.{dist}.{k}"] = r[k]
    for k, v in (reid.get("strongest") or {}).items():
        flat[f"reid.strongest.{k}"] = v
    if reid:
        flat["reid.gallery_images"] = reid.get("gallery", {}).get("images")
        flat["reid.chance_top1"] = reid.get("chance_top1")
        flat["reid.chance_top5"] = reid.get("chance_top5")
        flat["reid.with_other_images"] = reid.get("num_with_other_images")
    return flat


class ResultStore:
    """``results.jsonl`` of a sweep folder: one row per cell, appended atomically (a line is written whole
    or, killed mid-write, cut short at the end), rewritten deduplicated, exported to CSV and parquet."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / "results.jsonl"

    def _lines(self) -> Iterator[tuple[int, str, bool]]:
        """(line number, text, whether it is a last line with no newline after it) of each non-blank line."""
        try:
            lines = self.path.read_bytes().split(b"\n")
        except OSError as e:
            raise UserError(f"{self.path}: cannot be read ({e.strerror})") from None
        for n, raw in enumerate(lines, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                if n == len(lines):
                    continue  # cut short inside a character
                raise UserError(f"{self.path} line {n}: not UTF-8 text") from None
            if text.strip():
                yield n, text, n == len(lines)

    def read(self) -> dict[str, ResultRow]:
        """The rows by cell id (a cell's last row wins), in the order cells first appear."""
        rows: dict[str, ResultRow] = {}
        if not self.path.is_file():
            return rows
        for n, text, unterminated in self._lines():
            try:
                row = ResultRow.from_json(text, f"{self.path} line {n}")
            except UserError:
                if unterminated:
                    continue  # cut short by a kill while appending; the cell's row.json restores it
                raise
            rows[row.cell] = row
        return rows

    def rewrite(self, rows: Iterable[ResultRow]) -> None:
        write_text(self.path, "".join(r.to_json() + "\n" for r in rows))

    def append(self, row: ResultRow) -> None:
        data = (row.to_json() + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def export_tables(self, rows: list[ResultRow], utilities: dict[str, dict[str, Any]]) -> list[Path]:
        """``results.csv`` and, when pyarrow is installed, ``results.parquet``: one flat row per cell."""
        flats = [r.flat_row(utilities.get(r.utility_key or "")) for r in rows]
        columns: list[str] = []
        for f in flats:
            columns.extend(k for k in f if k not in columns)
        written = [_write_csv(self.folder / "results.csv", flats, columns)]
        try:
            written.append(_write_parquet(self.folder / "results.parquet", flats, columns))
        except ImportError:
            pass
        return written


def _write_csv(path: Path, flats: list[dict[str, Any]], columns: list[str]) -> Path:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for f in flats:
        w.writerow({k: ("" if f.get(k) is None else f.get(k)) for k in columns})
    return write_text(path, buf.getvalue())


def _write_parquet(path: Path, flats: list[dict[str, Any]], columns: list[str]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {}
    for k in columns:
        vals = [f.get(k) for f in flats]
        kinds = {type(v) for v in vals if v is not None}
        if kinds and not kinds <= {int, float} and not kinds <= {str} and not kinds <= {bool}:
            vals = [None if v is None else str(v) for v in vals]
        elif kinds and kinds <= {int, float} and float in kinds:
            vals = [None if v is None else float(v) for v in vals]
        cols[k] = vals
    with atomic_path(path, suffix=".parquet") as tmp:
        pq.write_table(pa.table(cols), tmp)
    return path


# ------------------------------------------------------------------------------------------ readers
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise UserError(f"{path}: not a readable JSON file") from None


def _read_mapping(path: Path) -> dict[str, Any]:
    """A JSON file that must hold an object; absent: ``{}``."""
    data = _read_json(path) if path.is_file() else {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: holds a {type(data).__name__}, not a JSON object")
    return data


def _yaml_mapping(path: Path) -> dict[str, Any]:
    """A YAML mapping the report can do without (a sweep.yaml, an experiment's config.yaml): ``{}`` when
    absent, unreadable or not a mapping."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) if path.is_file() else {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _observed_setting(m: dict[str, Any]) -> str:
    """An attack folder's defence, as the observation recorded it."""
    proto = m.get("protocol") or {"algorithm": (m.get("threat_model") or {}).get("protocol", "fedsgd")}
    specs = [dict(o["spec"]) if isinstance(o.get("spec"), dict) else {"name": o["name"]}
             for o in (m.get("obfuscation") or []) if isinstance(o, dict) and o.get("name")]
    return setting_label({"capture": {"obfuscation": specs, "protocol": {
        "algorithm": proto.get("algorithm", "fedsgd"), "local_steps": proto.get("local_steps"),
        "local_lr": proto.get("local_lr")}}})


def _observed_config(m: dict[str, Any]) -> dict[str, Any]:
    """What an attack folder's observation says was captured, in the shape of an experiment config."""
    d = m.get("data_description") or {}
    cfg = {"data": {k: d[k] for k in ("source", "path", "split", "size") if d.get(k) is not None},
           "capture": {"arch": m["model"].get("arch"), "batch_size": m.get("num_images"),
                       "protocol": m.get("protocol") or {}}}
    if not cfg["data"]:
        cfg.pop("data")
    return cfg


#: Values of metrics.json the single row reads with ``.get``: each must be a mapping when present.
_MAPPINGS = ("protocol", "threat_model", "model", "data_description", "baseline", "budget", "reid")


def read_metrics(path: Path) -> dict[str, Any]:
    """A ``metrics.json`` that holds a scored reconstruction, the values read as mappings checked to be
    mappings; anything else is a :class:`UserError` naming the file."""
    m = _read_json(path)
    if not isinstance(m, dict) or not isinstance(m.get("psnr"), (int, float)):
        raise UserError(f"{path}: holds no scored reconstruction")
    for k in _MAPPINGS:
        if m.get(k) is not None and not isinstance(m[k], dict):
            raise UserError(f"{path}: '{k}' is a {type(m[k]).__name__}, not a mapping")
    if not isinstance(m.get("obfuscation") or [], list):
        raise UserError(f"{path}: 'obfuscation' is not a list")
    return m


def _single_row(folder: Path) -> dict[str, Any]:
    """The row of one experiment folder (``gradleak run``) or attack folder (``gradleak attack --truth``)."""
    m = read_metrics(folder / "metrics.json")
    cfg = _yaml_mapping(folder / "config.yaml")
    attack = _read_mapping(folder / "attack.json")
    setting = setting_label(cfg) if isinstance(cfg.get("capture"), dict) and "obfuscation" in cfg["capture"] \
        else _observed_setting(m)
    name = str(m.get("attack", attack.get("attack", "?")))
    tm = m.get("threat_model") or {}
    if not cfg.get("capture") and isinstance(m.get("model"), dict):
        cfg = _observed_config(m)
    if m.get("prior") or (cfg.get("attack") or {}).get("prior") or tm.get("postprocessing"):
        name += " + prior"
    row = {"cell": folder.name, "index": 0, "status": "ok", "attack": name, "setting": setting, "params": {},
           "metrics": {**{k: m.get(k) for k in ("psnr", "ssim", "ms_ssim", "lpips", "lpips_note", "mse",
                                                "label_accuracy", "num_images")},
                       **({"without_postprocessing": m["without_postprocessing"]}
                          if isinstance(m.get("without_postprocessing"), dict) else {})},
           "metric_variants": m.get("metric_variants", {}), "threat_model": tm,
           "baseline": ({k: v for k, v in m["baseline"].items() if k != "per_image"}
                        if isinstance(m.get("baseline"), dict) else None),
           "gain_over_baseline": m.get("gain_over_baseline"), "budget": m.get("budget"),
           "converged": m.get("converged", (m.get("budget") or {}).get("converged")),
           "reid": m.get("reid"), "bits": m.get("bits"), "obfuscation": m.get("obfuscation", []),
           "epsilon": _record_epsilon(m.get("obfuscation") or []), "config": cfg,
           "versions": attack.get("versions"), "_folder": str(folder),
           "_truth": m.get("truth")}
    return ResultRow.from_dict(row, str(folder / "metrics.json")).as_dict()


def _record_epsilon(records: list[Any]) -> float | None:
    eps = [r.get("epsilon") for r in records if isinstance(r, dict) and _num(r.get("epsilon")) is not None]
    return float(eps[-1]) if eps else None


def read_results(folder: Path) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Rows (sweep, one experiment or one attack folder), the spec/config, and the kind. A folder with no
    readable result, or with a damaged one, is a :class:`UserError` that names the file."""
    folder = Path(folder)
    if (folder / "results.jsonl").is_file():
        rows = [r.as_dict() for r in ResultStore(folder).read().values()]
        if not any(r["status"] == "ok" for r in rows):
            failed = sum(r["status"] != "ok" for r in rows)
            raise UserError(f"{folder}: no finished cell in results.jsonl"
                            + (f" ({failed} failed; see {folder / 'cells'}/*/log.txt)" if failed else ""))
        spec = _yaml_mapping(folder / "sweep.yaml")
        for r in rows:
            r["_folder"] = str(folder / "cells" / r["cell"])
        return rows, spec, "sweep"
    if (folder / "metrics.json").is_file():
        row = _single_row(folder)
        return [row], row["config"] or {}, "experiment"
    if (folder / "reconstruction.npz").is_file():
        raise UserError(f"{folder}: holds reconstructions but no metrics.json; score them with "
                        f"'gradleak attack ... --truth TRUTH.npz'")
    raise UserError(f"{folder}: no readable results (neither results.jsonl of a sweep nor metrics.json of an "
                    f"experiment or attack)")


def read_utilities(folder: Path) -> dict[str, dict[str, Any]]:
    """The finished utility runs of a sweep folder: ``{utility key: its result summary}``; the runs of
    one config under several seeds (folders ``KEY``, ``KEY-s1``, ...) are merged by
    :func:`aggregate_utility`. A damaged ``result.json`` is a :class:`UserError` that names it."""
    import re

    runs: dict[str, list[dict[str, Any]]] = OrderedDict()
    for p in sorted(Path(folder, "utility").glob("*/result.json")):
        r = _read_mapping(p)
        u = r.get("utility") or {}
        if not isinstance(u, dict) or not isinstance(u.get("final") or {}, dict):
            raise UserError(f"{p}: 'utility' holds no final metrics")
        if r.get("status") == "ok":
            runs.setdefault(re.sub(r"-s\d+$", "", p.parent.name), []).append(u)
    return {k: aggregate_utility(v) for k, v in runs.items()}


#: Final metrics whose mean and 95 % interval over seeds the report shows.
_INTERVAL_METRICS = ("roc_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "f1", "loss")


def aggregate_utility(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One utility config run under several seeds: ``final`` holds the mean of each final metric,
    ``final_ci95`` its two-sided 95 % Student-t interval over the seeds (None for one seed), ``seeds`` the
    number of runs and ``per_seed_final`` each run's final metrics. Other keys come from the first run
    (epsilon: the largest)."""
    if not runs:
        return {}
    out = dict(runs[0])
    finals = [r.get("final") or {} for r in runs]
    n = len(runs)
    out["seeds"] = n
    out["per_seed_final"] = finals
    mean: dict[str, Any] = dict(finals[0])
    ci: dict[str, Any] = {}
    for k in _INTERVAL_METRICS:
        vals = [v for v in (_num(f.get(k)) for f in finals) if v is not None]
        if not vals:
            continue
        m = float(np.mean(vals))
        mean[k] = m
        if len(vals) > 1:
            from scipy.stats import t

            half = float(t.ppf(0.975, len(vals) - 1) * np.std(vals, ddof=1) / np.sqrt(len(vals)))
            ci[k] = [m - half, m + half]
        else:
            ci[k] = None
    out["final"] = mean
    out["final_ci95"] = ci
    eps = [e for e in (_last(r.get("epsilon")) for r in runs) if e is not None]
    out["epsilon"] = max(eps) if eps else None
    return out


def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _last(x: Any) -> float | None:
    if isinstance(x, list):
        return _num(x[-1]) if x else None
    return _num(x)


__all__ = ["ResultRow", "ResultStore", "read_results", "read_metrics", "read_utilities", "aggregate_utility"]
