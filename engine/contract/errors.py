"""The exceptions a user of stepweave catches, whichever front door they came through."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The workers are gone; every request fails until the engine is restarted."""


class ServerUnavailableError(EngineDeadError):
    """The server cannot be reached, refused this client, stopped answering or is shutting down."""


class OverloadedError(RuntimeError):
    """The waiting queue is full; the request was not accepted."""
