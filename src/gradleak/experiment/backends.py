"""Where a sweep's tasks run: local worker processes or Ray.

A task is a dict: ``kind`` (``cell`` or ``utility``), ``id``, ``config`` and the options of its kind.
:func:`execute_task` runs one into a folder and never raises: a failure is a result with ``status``
``failed``. A backend's ``run(tasks, staging, done)`` asks ``staging(task)`` for each task's folder and
calls ``done(task, result, folder)`` in the driver as each task ends.

Local workers are forked from a preloaded server (imports paid once) and hold the read end of a pipe
whose only writer is the sweep: when the sweep dies, even by SIGKILL, the pipe reaches end-of-file and
every worker exits at once, so no orphan keeps computing into a folder nobody reads.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import tempfile
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from ..data.pseudonym import ENV_KEY, pseudonym_key
from ..errors import UserError
from ..logs import recording
from . import config as config_mod
from .outputs import _jsonable, write_json, write_text

log = logging.getLogger(__name__)

Staging = Callable[[dict[str, Any]], Path]
Done = Callable[[dict[str, Any], dict[str, Any], Path], None]

#: What a sweep keeps of a utility run's result (the full ``utility.json`` stays in its folder).
UTILITY_KEYS = ("final", "best", "best_round", "rounds_run", "bits_per_round", "bits_per_update",
                "dense_bits_per_update", "epsilon", "delta", "threat_model", "metric_variants", "model",
                "protocol", "seconds", "engine")

#: What a cell's result keeps of its attack's summary (``attack.json``).
_ATTACK_KEYS = ("iterations", "seconds", "seconds_per_iteration", "converged", "pipeline", "final_loss", "settings")


# ------------------------------------------------------------------------------------------------ tasks
def _set_threads(n: int) -> None:
    import torch
    torch.set_num_threads(max(1, int(n)))


def _run_cell(task: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from .run import run_cell

    cfg = task["config"]
    write_text(workdir / "config.yaml", config_mod.dump(cfg))
    metrics = run_cell(cfg, workdir, progress=False)
    if not task.get("keep_observation", False):
        (workdir / "observation.pt").unlink(missing_ok=True)
    summary = json.loads((workdir / "attack.json").read_text())
    return {"status": "ok", "metrics": metrics, "attack": {k: summary.get(k) for k in _ATTACK_KEYS}}


def _run_utility(task: dict[str, Any], workdir: Path) -> dict[str, Any]:
    from .utility import run_utility

    cfg = {**task["config"], "threads": int(task.get("threads", 1))}
    out = run_utility(cfg, progress=False, folder=workdir / "run")
    return {"status": "ok", "utility": _jsonable({k: out[k] for k in UTILITY_KEYS if k in out})}


_KINDS = {"cell": _run_cell, "utility": _run_utility}


def execute_task(task: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one task (a cell or a utility run) into ``workdir``. Never raises: failures are results."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    _set_threads(task.get("threads", 1))
    t0 = time.perf_counter()
    result: dict[str, Any] = {"kind": task["kind"], "id": task["id"], "started": time.time(),
                              "host": socket.gethostname()}
    with recording() as rec:
        try:
            result.update(_KINDS[task["kind"]](task, workdir))
        except BaseException as e:  # noqa: BLE001 - a failing cell is recorded and the sweep goes on
            if isinstance(e, KeyboardInterrupt):
                raise
            msg = " ".join(str(e).split()) or type(e).__name__
            result.update(status="failed", error=f"{type(e).__name__}: {msg}",
                          traceback=traceback.format_exc(limit=20))
            log.info(f"failed: {type(e).__name__}: {msg}")
    result["seconds"] = round(time.perf_counter() - t0, 3)
    result["finished"] = time.time()
    write_text(workdir / "log.txt", rec.text() + (result.get("traceback", "") or ""))
    return _jsonable(result)


def failed_result(task: dict[str, Any], error: str) -> dict[str, Any]:
    """The result of a task whose worker died before it could report."""
    return {"kind": task["kind"], "id": task["id"], "status": "failed", "error": error, "seconds": None}


# ------------------------------------------------------------------------------------------ local workers
def _child_main(task: dict[str, Any], workdir: str, result_path: str, lifeline: Any) -> None:
    """Entry point of a local worker process."""
    _exit_with_sweep(lifeline)
    result = execute_task(task, Path(workdir))
    write_json(Path(result_path), result)


def _exit_with_sweep(lifeline: Any) -> None:
    """Exit this process as soon as ``lifeline`` (the read end of a pipe only the sweep writes to)
    reaches end-of-file, i.e. when the sweep has died, however it died."""
    fd = lifeline.fileno()

    def watch() -> None:
        while True:
            try:
                if not os.read(fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        os._exit(70)

    threading.Thread(target=watch, name="gradleak-lifeline", daemon=True).start()


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
            self.ctx.set_forkserver_preload(["torch._dynamo", "gradleak.experiment.backends",
                                             "gradleak.experiment.run", "gradleak.attacks"])
        # the workers' lifeline: the sweep keeps the only write end; its death closes it
        self._lifeline, self._keep = self.ctx.Pipe(duplex=False)

    def _start(self, task: dict[str, Any], staging: Staging) -> tuple[Any, dict[str, Any], Path, Path]:
        task = {**task, "threads": self.threads}
        workdir = staging(task)
        result_path = workdir.parent / f".{workdir.name}.result.json"
        result_path.unlink(missing_ok=True)
        p = self.ctx.Process(target=_child_main, args=(task, str(workdir), str(result_path), self._lifeline),
                             daemon=True)
        p.start()
        return p, task, workdir, result_path

    @staticmethod
    def _result(p: Any, task: dict[str, Any], result_path: Path) -> dict[str, Any]:
        p.join()
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            result_path.unlink()
            return result
        return failed_result(task, f"worker process died (exit code {p.exitcode})")

    def run(self, tasks: list[dict[str, Any]], staging: Staging, done: Done) -> None:
        from multiprocessing.connection import wait

        queue = list(tasks)
        running: dict[Any, tuple[Any, dict[str, Any], Path, Path]] = {}
        try:
            while queue or running:
                while queue and len(running) < self.workers:
                    started = self._start(queue.pop(0), staging)
                    running[started[0].sentinel] = started
                for sentinel in wait(list(running), timeout=1.0):
                    p, task, workdir, result_path = running.pop(sentinel)
                    done(task, self._result(p, task, result_path), workdir)
        finally:
            for p, *_ in running.values():
                p.kill()
                p.join()


# ---------------------------------------------------------------------------------------------------- Ray
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


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


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
            # the workers pseudonymise patients with the driver's key, so that every cell's pseudonyms agree
            env = {ENV_KEY: pseudonym_key().decode("utf-8")}
            pythonpath = os.environ.get("PYTHONPATH")
            if pythonpath and not address:
                env["PYTHONPATH"] = pythonpath
            kwargs["runtime_env"] = {"env_vars": env}
            try:
                ray.init(**kwargs)
            except Exception as e:  # noqa: BLE001 - no cluster at that address, etc.
                where = f" at {address}" if address else ""
                raise UserError(f"could not connect to Ray{where}: {_one_line(e)}") from None

    def _gpus(self, task: dict[str, Any]) -> float:
        return self.gpus_per_cell if str(task.get("device", "cpu")).startswith("cuda") else 0.0

    def _check_gpus(self, tasks: list[dict[str, Any]]) -> None:
        if not any(self._gpus(t) for t in tasks):
            return
        have = float(self.ray.cluster_resources().get("GPU", 0))
        if have < self.gpus_per_cell:
            if self.started_here:
                self.ray.shutdown()
            raise UserError(f"cells run on cuda and ask Ray for {self.gpus_per_cell:g} GPU each, but the "
                            f"Ray cluster has {have:g} GPUs")

    def _collect(self, ref: Any, task: dict[str, Any], workdir: Path) -> dict[str, Any]:
        try:
            out = self.ray.get(ref)
        except Exception as e:  # noqa: BLE001 - the worker died; record and go on
            return failed_result(task, f"Ray task failed: {type(e).__name__}: {_one_line(e)}")
        for rel, data in out["files"].items():
            path = workdir / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return out["result"]

    def run(self, tasks: list[dict[str, Any]], staging: Staging, done: Done) -> None:
        ray = self.ray
        self._check_gpus(tasks)
        remote = ray.remote(_ray_task)
        pending = {remote.options(num_cpus=1, num_gpus=self._gpus(t), max_retries=0).remote({**t, "threads": 1}): t
                   for t in tasks}
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
                for ref in ready:
                    task = pending.pop(ref)
                    workdir = staging(task)
                    done(task, self._collect(ref, task, workdir), workdir)
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
            if self.started_here:
                ray.shutdown()


__all__ = ["UTILITY_KEYS", "execute_task", "failed_result", "LocalBackend", "RayBackend"]
