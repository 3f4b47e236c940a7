"""How a finished request ended, in one word: what the metrics count, the server logs and the
HTTP API turns into a status code."""

from __future__ import annotations

from engine.contract.outputs import RequestOutput

ABORTED_ERROR = "request aborted"
OVERLOADED_PREFIX = "engine overloaded"  # the scheduler's OverloadedError, carried as an output's error
OUTCOMES = ("ok", "failed", "aborted", "overloaded", "rejected")


def outcome_of(output: RequestOutput) -> str:
    """ "ok", "aborted", "overloaded" (refused by a full queue) or "failed", for a final output."""
    if output.error is None:
        return "ok"
    if output.error == ABORTED_ERROR:
        return "aborted"
    if output.error.startswith(OVERLOADED_PREFIX):
        return "overloaded"
    return "failed"
