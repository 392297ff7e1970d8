"""What a defence costs the model: federated training of the classifier under an obfuscation.

``gradleak utility CONFIG.yaml`` (or :func:`run_utility`) trains the pneumonia classifier with K
simulated clients for R rounds (:mod:`gradleak.federated.simulation`), every client update obfuscated
exactly as in an attack capture, and writes into ``experiments/<name>-<timestamp>/``:

- ``utility.json``: per-round and final metrics, bits sent, epsilon spent (the dict :func:`run_utility`
  returns);
- ``learning_curves.png``; ``model.pt`` (the final global model, see :mod:`gradleak.models.checkpoint`),
  ``model_best.pt`` when the best round is not the last, ``model_rR.pt`` for each of ``save_rounds``;
- ``config.yaml`` (resolved), ``log.txt``, ``versions.json``.

The folder is written as a hidden ``.partial`` folder renamed into place at the end, so a failed run
leaves nothing behind.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

import numpy as np
import torch
from pydantic import Field, NonNegativeInt, ValidationInfo, field_validator, model_validator

from .. import obfuscation
from ..data import load_dataset, split_by_patient
from ..errors import UserError
from ..federated.partition import PARTITIONS, partition_by_patient
from ..federated.protocol import ALGORITHMS
from ..federated.settings import MONITORS, SAMPLINGS, Evaluation, Settings
from ..federated.simulation import SimulationResult, dp_records, schedule_dp, simulate
from ..flower import ENGINES, choose_engine
from ..logs import recording
from ..federated.evaluation import AUC_VARIANT, THRESHOLD_VARIANT
from ..models import build
from ..models.checkpoint import save_model
from .config import (Count, DataSpec, Fraction, Section, Stds, dump, fedavg_lr, merge_with_overrides,
                     read_yaml)
from .outputs import versions, write_json, write_text
from .run import new_folder

FORMAT = "gradleak-utility/1"

log = logging.getLogger(__name__)

_FED, _EVAL = Settings(), Evaluation()  # the federation's defaults live in its dataclasses


class ModelSection(Section):
    arch: str = "convnet"
    num_classes: Count = 2
    model_seed: int = 0
    options: dict[str, Any] | None = None  # arch-specific, e.g. {width: 8, depth: 4, pool_first: true}
    mean: list[float] = [0.5]
    std: Stds = [0.5]


class Federation(Section):
    """:class:`gradleak.federated.simulation.Settings`, checked, and the engine that runs the clients."""

    num_clients: Count = _FED.num_clients
    partition: Literal[PARTITIONS] = _FED.partition
    alpha: Annotated[float, Field(gt=0)] = _FED.alpha
    clients_per_round: Annotated[float, Field(gt=0, le=1)] = _FED.clients_per_round
    client_sampling: Literal[SAMPLINGS] = _FED.client_sampling
    rounds: Count = _FED.rounds
    algorithm: Literal[ALGORITHMS] = _FED.algorithm
    local_epochs: Count = _FED.local_epochs
    local_steps: Count | None = _FED.local_steps
    local_lr: Annotated[float, Field(ge=0)] = _FED.local_lr
    local_batch_size: Count | None = _FED.local_batch_size
    server_lr: Annotated[float, Field(gt=0)] = _FED.server_lr
    server_momentum: Annotated[float, Field(ge=0, lt=1)] = _FED.server_momentum
    sends_buffers: bool = _FED.sends_buffers
    class_balanced: bool = _FED.class_balanced
    engine: Literal[ENGINES] | None = None  # flower or local; None: flower when it is installed and usable

    _local_lr = field_validator("local_lr")(fedavg_lr)


class EvaluationSection(Section):
    """:class:`gradleak.federated.simulation.Evaluation`, checked."""

    every: Count = _EVAL.every
    threshold: Fraction = _EVAL.threshold
    monitor: Literal[tuple(MONITORS)] = _EVAL.monitor
    patience: Count | None = _EVAL.patience
    min_delta: float = _EVAL.min_delta
    batch_size: Count = _EVAL.batch_size


class Privacy(Section):
    delta: Fraction = 1.0e-5  # delta for epsilon of Gaussian noise whose record names none


class UtilityConfig(Section):
    """The config of ``gradleak utility``."""

    name: str = "utility"
    seed: NonNegativeInt = 0  # seeds the hold-out split, the partition, client sampling, data order and noise
    output_dir: str = "experiments"
    device: str = "cpu"
    threads: Count | None = None  # torch CPU threads (None: torch's default); 1 is fastest on a busy machine
    data: DataSpec = Field(default_factory=dict)
    holdout: float = 0.2  # fraction of the data's patients held out for evaluation
    eval_data: Any = None  # a data spec: evaluate on it instead (training then uses every image of `data`)
    model: ModelSection = Field(default_factory=ModelSection)
    federation: Federation = Field(default_factory=Federation)
    obfuscation: list[Any] = []  # applied to every client update, as in capture.obfuscation
    privacy: Privacy = Field(default_factory=Privacy)
    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    save_rounds: list[int] = []  # also keep model_rR.pt after these rounds

    @field_validator("eval_data")
    @classmethod
    def _data_spec(cls, v: Any) -> Any:
        if v is not None and not isinstance(v, (str, dict)):
            raise ValueError("must be a data spec (text or mapping)")
        return v

    @field_validator("save_rounds")
    @classmethod
    def _rounds_run(cls, v: list[int], info: ValidationInfo) -> list[int]:
        fed = info.data.get("federation")
        bad = [r for r in v if fed is not None and not 1 <= r <= fed.rounds]
        if bad:
            raise ValueError(f"must be a list of rounds in 1..{fed.rounds}")
        return v

    @model_validator(mode="after")
    def _holdout(self) -> "UtilityConfig":
        if self.eval_data is None and not 0 < self.holdout < 1:
            raise ValueError(f"'holdout' must be a fraction in (0, 1), got {self.holdout}")
        return self


METRIC_VARIANTS = {
    "roc_auc": AUC_VARIANT,
    "accuracy": "fraction of evaluation images classified correctly; " + THRESHOLD_VARIANT,
    "balanced_accuracy": "(sensitivity + specificity) / 2",
    "sensitivity": "recall of class 1 (pneumonia): TP / (TP + FN)",
    "specificity": "recall of class 0 (normal): TN / (TN + FP)",
    "f1": "F1 of class 1 (pneumonia): 2 TP / (2 TP + FP + FN)",
    "loss": "mean cross-entropy of the global model (eval mode) on the evaluation images, unweighted",
    "bits": "bits uploaded by all clients of a round, each update's cost as its obfuscation reports it "
            "(32 per entry when unobfuscated); the download of the global model is not counted",
    "epsilon": "client-level (epsilon, delta)-DP spent so far by each client's clipped, noised update, "
               "accounted over the rounds with the client sampling rate (None: no Gaussian mechanism)",
}


def from_dict(user: dict[str, Any], source: str = "config", overrides: dict[str, Any] | None = None
              ) -> dict[str, Any]:
    """Merge a utility config over the defaults and check it (one-line :class:`UserError` on a problem)."""
    cfg = merge_with_overrides(user, UtilityConfig, source, overrides)
    st = settings(cfg)
    try:
        choose_engine(cfg["federation"]["engine"])  # engine: flower needs Flower installed
        obfuscation.resolve_all(schedule_dp([obfuscation.normalize(s) for s in cfg["obfuscation"]],
                                            st.sample_rate, st.rounds))
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    return cfg


def load(path: str | Path, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read and check a utility YAML file."""
    return from_dict(read_yaml(path), source=str(path), overrides=overrides)


def settings(cfg: dict[str, Any]) -> Settings:
    return Settings(**{k: v for k, v in cfg["federation"].items() if k != "engine"})


def _describe(ds, idx: np.ndarray) -> dict[str, Any]:
    y = ds.labels[idx]
    return {**ds.describe(), "num_images": int(len(idx)),
            "num_patients": int(len({ds.patient_ids[i] for i in idx})),
            "class_counts": [int((y == c).sum()) for c in range(max(2, len(ds.classes)))]}


def _load_data(cfg: dict[str, Any]):
    ds = load_dataset(cfg["data"])
    all_idx = np.arange(len(ds))
    if cfg["eval_data"] is not None:
        ev_ds = load_dataset(cfg["eval_data"], size=ds.size)
        train_idx, ev_idx = all_idx, np.arange(len(ev_ds))
        ev_source = "eval_data"
    else:
        ev, tr = split_by_patient(ds, cfg["holdout"], seed=cfg["seed"])
        ev_ds, train_idx, ev_idx = ds, np.asarray(tr, dtype=np.int64), np.asarray(ev, dtype=np.int64)
        ev_source = f"held-out patients ({cfg['holdout']:.0%} of the data's images, by patient)"
    if len(train_idx) == 0 or len(ev_idx) == 0:
        raise UserError(f"the data leaves {len(train_idx)} training and {len(ev_idx)} evaluation images")
    t0 = time.perf_counter()
    x = ds.load(train_idx.tolist())
    y = torch.as_tensor(ds.labels[train_idx], dtype=torch.int64)
    xe = ev_ds.load(ev_idx.tolist())
    ye = torch.as_tensor(ev_ds.labels[ev_idx], dtype=torch.int64)
    if x.shape[1:] != xe.shape[1:]:
        raise UserError(f"evaluation images are {tuple(xe.shape[1:])} but training images {tuple(x.shape[1:])}")
    log.info(f"data: {len(train_idx)} training images, {len(ev_idx)} evaluation images ({ev_source}), "
        f"decoded in {time.perf_counter() - t0:.1f}s")
    train_p = {ds.patient_ids[i] for i in train_idx}
    overlap = len(train_p & {ev_ds.patient_ids[i] for i in ev_idx}) if ev_ds is ds or \
        ev_ds.describe().get("source") == ds.describe().get("source") else 0
    info = {"train": _describe(ds, train_idx), "eval": {**_describe(ev_ds, ev_idx), "split": ev_source},
            "eval_patients_in_training": int(overlap)}
    pids = [ds.patient_ids[i] for i in train_idx]
    return x, y, xe, ye, ds.labels[train_idx], pids, info


def _build_model(cfg: dict[str, Any], x: torch.Tensor):
    """The configured model for images like ``x``, and its header."""
    mc = cfg["model"]
    header = {"arch": mc["arch"], "num_classes": int(mc["num_classes"]), "in_channels": int(x.shape[1]),
              "image_size": int(x.shape[-1])}
    if mc["options"]:
        header["options"] = dict(mc["options"])
    try:
        model = build(header["arch"], header["num_classes"], header["in_channels"], header["image_size"],
                      seed=mc["model_seed"], options=mc["options"] or None, mean=mc["mean"], std=mc["std"])
    except TypeError as e:
        raise UserError(f"model.options {mc['options']} do not fit {mc['arch']} ({e})") from None
    return model, header


ENGINE_TEXT = {"flower": "Flower's simulation engine (one virtual node per client, on Ray)",
               "local": "the built-in loop (clients one after another in this process)"}


def _engine(cfg: dict[str, Any]) -> tuple[Callable[..., SimulationResult], dict[str, Any]]:
    """The ``simulate`` of the configured engine, and what ``utility.json`` records of it."""
    name, note = choose_engine(cfg["federation"]["engine"])
    log.info(f"engine: {name}, {ENGINE_TEXT[name]}" + (f"; {note}" if note else ""))
    if name == "flower":
        from ..flower import simulate as flower_simulate
        return flower_simulate, {"name": name, "note": note}
    return simulate, {"name": name, "note": note}


def _round_logger(cfg: dict[str, Any], header: dict[str, Any], folder: Path, saved: list[str]):
    """The simulation's ``on_round``: a log line per round, and ``model_rR.pt`` for each of ``save_rounds``."""
    keep, mc = set(cfg["save_rounds"]), cfg["model"]

    def on_round(r: int, state: dict[str, torch.Tensor], rep: dict[str, Any]) -> None:
        msg = f"round {r}: {len(rep['clients'])} clients, {rep['bits']} bits"
        if "roc_auc" in rep:
            msg += f", AUC {rep['roc_auc']:.4f}, accuracy {rep['accuracy']:.4f}, loss {rep['loss']:.4f}"
        if rep.get("epsilon") is not None:
            msg += f", epsilon {rep['epsilon']:.3f}"
        log.info(msg + f" ({rep['seconds']:.1f}s)")
        if r in keep:
            save_model(folder / f"model_r{r}.pt", header, state, mean=mc["mean"], std=mc["std"], round=r,
                       meta={"experiment": cfg["name"]})
            saved.append(f"model_r{r}.pt")

    return on_round


def _save_models(cfg: dict[str, Any], header: dict[str, Any], folder: Path, res: SimulationResult,
                 monitor: str) -> list[str]:
    """``model.pt`` (the final global model) and ``model_best.pt`` when the best round is not the last."""
    mc, rounds_run = cfg["model"], len(res.rounds)
    save_model(folder / "model.pt", header, res.final_state, mean=mc["mean"], std=mc["std"], round=rounds_run,
               meta={"experiment": cfg["name"]})
    if res.best_round is None or res.best_round == rounds_run or res.best_state is None:
        return ["model.pt"]
    save_model(folder / "model_best.pt", header, res.best_state, mean=mc["mean"], std=mc["std"],
               round=res.best_round, meta={"experiment": cfg["name"], "monitor": monitor})
    return ["model.pt", "model_best.pt"]


def _threat_model(cfg: dict[str, Any], st: Settings, applied: list[str], dp: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "obfuscation": applied,
        "server_sees": "each participating client's update after its obfuscation",
        "buffers_sent": bool(st.sends_buffers),
        "dp": ({"unit": "client (its whole update in a round)", "delta": dp[0].get("delta", cfg["privacy"]["delta"]),
                "accountant": dp[0].get("accountant", "rdp"), "sample_rate": st.sample_rate,
                "noise_multiplier": dp[0]["noise_multiplier"], "clip": dp[0]["clip"]} if dp else None),
    }


def _summary(cfg: dict[str, Any], res: SimulationResult, ev_settings: Evaluation, num_params: int) -> dict[str, Any]:
    """The run's results in ``utility.json``: rounds, final and best metrics, bits, epsilon."""
    dp = dp_records(res.obfuscation)
    return {
        "rounds": res.rounds,
        "rounds_run": len(res.rounds),
        "stopped_early": res.stopped_early,
        "final": res.final,
        "final_round": len(res.rounds),
        "monitor": ev_settings.monitor,
        "best_round": res.best_round,
        "best": res.best,
        "bits_per_round": float(np.mean([r["bits"] for r in res.rounds])) if res.rounds else 0.0,
        "bits_per_update": res.bits_per_update,
        "dense_bits_per_update": int(32 * num_params),
        "epsilon": res.rounds[-1].get("epsilon") if res.rounds else None,
        "delta": (dp[0].get("delta", cfg["privacy"]["delta"]) if dp else None),
        "obfuscation": res.obfuscation,
        "metric_variants": METRIC_VARIANTS,
    }


def run_utility(cfg: dict[str, Any], *, progress: bool = True, folder: Path | None = None) -> dict[str, Any]:
    """Train the classifier federatedly under ``cfg`` (a config checked by :func:`from_dict`/:func:`load`)
    and write the experiment folder. Returns the content of ``utility.json``:

    ``format`` ("gradleak-utility/1"), ``name``, ``folder`` (the experiment folder),
    ``config`` (resolved), ``model`` (the header of ``model.pt``), ``data`` (``train``/``eval``
    descriptions with image, patient and class counts, and ``eval_patients_in_training``),
    ``partition`` (scheme, alpha, per-client image/patient/class counts), ``protocol`` (the federation
    settings and the client ``sample_rate``), ``threat_model`` (obfuscation names, whether BN buffers
    travel, and the DP unit/delta/accountant), ``engine`` (``name``: ``flower`` or ``local``, the engine
    that ran the clients, and ``note``: why, when it is not the one configured or the default),
    ``rounds``: one dict per round run with ``round``, ``clients`` (indices of the clients that took
    part), ``train_images`` (their images), ``bits`` (their upload), ``epsilon`` (client-level epsilon
    spent so far; None without a Gaussian mechanism), ``seconds`` and, when the round was evaluated, the
    metrics ``accuracy``, ``balanced_accuracy``, ``roc_auc``, ``sensitivity``, ``specificity``,
    ``precision``, ``f1``, ``loss``, ``threshold``, ``confusion`` (tp/fp/tn/fn) and ``eval_images``;
    ``final`` (those metrics of the final model, with ``num_images`` evaluated) and ``final_round``;
    ``best`` and ``best_round`` (by ``monitor``); ``stopped_early``; ``rounds_run``; ``bits_per_round`` (mean over rounds of all
    clients' upload); ``bits_per_update`` (mean per client update); ``dense_bits_per_update`` (32 per
    parameter); ``epsilon`` (after the last round, or None) and ``delta``; ``obfuscation`` (the
    records of the last client update); ``metric_variants``; ``seconds``; ``versions``; ``files``.
    """
    final_dir = Path(folder) if folder is not None else new_folder(Path(cfg["output_dir"]), cfg["name"])
    if final_dir.exists():
        raise UserError(f"output folder already exists: {final_dir}")
    partial = final_dir.parent / f".{final_dir.name}.partial"
    partial.mkdir(parents=True, exist_ok=False)
    threads_before = torch.get_num_threads()
    try:
        if cfg["threads"] is not None:
            torch.set_num_threads(int(cfg["threads"]))
        with recording() as rec:
            result = _run(cfg, partial, final_dir, progress)
        write_json(partial / "utility.json", result)
        write_json(partial / "versions.json", versions())
        write_text(partial / "log.txt", rec.text())
        partial.rename(final_dir)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        torch.set_num_threads(threads_before)
    return result


def _run(cfg: dict[str, Any], partial: Path, final_dir: Path, progress: bool) -> dict[str, Any]:
    """The body of :func:`run_utility`: train, write the models and the curves into ``partial``, and
    return the content of ``utility.json``."""
    t_start = time.perf_counter()
    st, ev_settings = settings(cfg), Evaluation(**cfg["evaluation"])
    specs = [obfuscation.normalize(s) for s in cfg["obfuscation"]]
    applied = [s["name"] for s in specs] or ["none"]
    write_text(partial / "config.yaml", dump(cfg))
    x, y, xe, ye, train_labels, pids, data_info = _load_data(cfg)
    part = partition_by_patient(train_labels, pids, st.num_clients, scheme=st.partition, alpha=st.alpha,
                                seed=cfg["seed"])
    clients_info = part.describe(np.asarray(train_labels), pids)
    log.info(f"partition: {st.partition}" + (f" (alpha {st.alpha})" if st.partition == "dirichlet" else "")
             + f", {st.num_clients} clients of " + ", ".join(str(c["num_images"]) for c in clients_info)
             + " images")
    model, header = _build_model(cfg, x)
    num_params = sum(p.numel() for p in model.parameters())
    log.info(f"model: {header}, {num_params} parameters; {st.algorithm}, {st.rounds} rounds, "
             f"obfuscation {', '.join(applied)}")
    run_federation, engine = _engine(cfg)
    saved: list[str] = []
    res = run_federation(model, x, y, part.clients, xe, ye, st, evaluation=ev_settings, obfuscations=specs,
                         seed=cfg["seed"], delta=cfg["privacy"]["delta"], device=cfg["device"],
                         progress=progress, on_round=_round_logger(cfg, header, partial, saved))
    files = _save_models(cfg, header, partial, res, ev_settings.monitor) + saved
    from ..figures.curves import learning_curves

    title = f"{cfg['name']}: {st.algorithm}, {st.num_clients} clients, obfuscation " + ", ".join(applied)
    learning_curves(res.rounds, partial / "learning_curves.png", title=title, best_round=res.best_round)
    f = res.final or {}
    log.info(f"final (round {len(res.rounds)}): AUC {f.get('roc_auc', float('nan')):.4f}, accuracy "
             f"{f.get('accuracy', float('nan')):.4f}; best round {res.best_round} by {ev_settings.monitor}")
    return {
        "format": FORMAT, "name": cfg["name"], "folder": str(final_dir), "config": cfg, "model": header,
        "num_parameters": int(num_params), "data": data_info,
        "partition": {"scheme": part.scheme, "alpha": part.alpha, "attempts": part.attempts, "clients": clients_info},
        "protocol": {**dataclasses.asdict(st), "sample_rate": st.sample_rate,
                     "update_is": "gradient" if st.algorithm == "fedsgd" else "weight_delta"},
        "threat_model": _threat_model(cfg, st, applied, dp_records(res.obfuscation)),
        "engine": engine,
        **_summary(cfg, res, ev_settings, num_params),
        "seconds": time.perf_counter() - t_start,
        "versions": versions(),
        "files": sorted(files + ["utility.json", "learning_curves.png", "config.yaml", "log.txt", "versions.json"]),
    }


__all__ = ["FORMAT", "UtilityConfig", "from_dict", "load", "run_utility", "settings"]
