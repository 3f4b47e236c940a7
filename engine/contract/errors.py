"""The exceptions a user of stepweave catches, whichever front door they came through."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The workers are gone; every request fails until the engine is restarted."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        # What happened, without the advice around it (e.g. "worker 0 (pid 7) died with exit code -9").
        self.reason = reason if reason is not None else message


class ServerUnavailableError(EngineDeadError):
    """The server cannot be reached, refused this client, stopped answering or is shutting down."""


class OverloadedError(RuntimeError):
    """The waiting queue is full; the request was not accepted."""


class DeadlineUnmeetableError(ValueError):
    """The request's deadline_s is shorter than it needs even with the workers to itself
    (EngineConfig.deadline_admission="reject"); it was not accepted."""
