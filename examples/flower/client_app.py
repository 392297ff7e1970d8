"""A hospital: trains the global model on a batch of its chest X-rays, and obfuscates what it sends.

The two lines that put gradleak's obfuscations into a Flower client are the import of
``obfuscation_mod`` and ``mods=[obfuscation_mod(OBFUSCATIONS)]``; the train function computes the update
with gradleak's client (any training loop that returns new weights works with the mod as well).
"""

from __future__ import annotations

from typing import Any, Sequence

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from gradleak.flower import obfuscation_mod, train_reply
from task import new_model, protocol, round_batch, settings

OBFUSCATIONS = ["qsgd:levels=16"]  # what every hospital does to its update (gradleak capture's specs)


def make_app(obfuscations: Sequence[Any] = OBFUSCATIONS, overrides: dict[str, Any] | None = None) -> ClientApp:
    app = ClientApp(mods=[obfuscation_mod(obfuscations)])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        cfg = settings(context.run_config, overrides)
        hospital = int(context.node_config["partition-id"])
        images, labels = round_batch(cfg, hospital, int(msg.content["config"]["server-round"]))
        return train_reply(msg, new_model(cfg), images, labels, protocol(cfg))

    return app


app = make_app()
