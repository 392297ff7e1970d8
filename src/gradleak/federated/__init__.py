"""The victim side's federated client (and, later, multi-round simulation)."""

from .client import client_update
from .protocol import Protocol, local_update

__all__ = ["Protocol", "client_update", "local_update"]
