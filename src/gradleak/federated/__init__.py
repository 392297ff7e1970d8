"""The victim side's federated client, the server's arithmetic, and multi-round simulation."""

from .arithmetic import fedavg_delta_scale, fedavg_gradient_scale, mean_buffers, mean_update
from .client import check_finite, check_sent, client_update, nonfinite
from .protocol import ObservedProtocol, Protocol, local_update

__all__ = ["ObservedProtocol", "Protocol", "check_finite", "check_sent", "client_update", "fedavg_delta_scale",
           "fedavg_gradient_scale", "local_update", "mean_buffers", "mean_update", "nonfinite"]
