"""The server: Flower's FedAvg (optionally with Flower's central DP), and a curious capture in front of it.

Every update a hospital sends is written as ``<capture-dir>/roundRRR/clientK.pt``, an Observation file
that ``gradleak attack`` reads. The server also scores the global model on its held-out patients after
every round and writes the final model as ``<capture-dir>/model.pt`` (a gradleak model checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from gradleak.federated.simulation import evaluate
from gradleak.flower import CaptureStrategy
from gradleak.models.checkpoint import save_model
from task import held_out, model_header, new_model, settings


def make_app(overrides: dict[str, Any] | None = None) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        cfg = settings(context.run_config, overrides)
        hospitals = int(cfg["num-hospitals"])
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=hospitals,
                          min_available_nodes=hospitals)
        if float(cfg["dp-noise"]) > 0:
            strategy = DifferentialPrivacyServerSideFixedClipping(strategy, float(cfg["dp-noise"]),
                                                                  float(cfg["dp-clip"]), hospitals)
        folder = Path(cfg["capture-dir"])
        capture = CaptureStrategy(strategy, folder, model=model_header(cfg))
        model = new_model(cfg)
        images, labels = held_out(cfg)

        def score(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            m = evaluate(model, arrays.to_torch_state_dict(), images, labels)
            return MetricRecord({"roc_auc": float(m["roc_auc"]), "accuracy": float(m["accuracy"]),
                                 "loss": float(m["loss"])})

        result = capture.start(grid, ArrayRecord(model.state_dict()), num_rounds=int(cfg["num-server-rounds"]),
                               evaluate_fn=score)
        save_model(folder / "model.pt", model_header(cfg), result.arrays.to_torch_state_dict(),
                   mean=[0.5], std=[0.5], round=int(cfg["num-server-rounds"]), meta={"source": "flower example"})

    return app


app = make_app()
