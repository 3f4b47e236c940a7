"""Messages between the engine and the workers.

The same Structs are used by the in-process executor and, encoded with msgpack, on the ZeroMQ
wire, so both executors see exactly the same batches. A step batch carries new requests in full,
running ones by id, and the ids whose state the workers must drop. Images never ride inside a
Struct: `StepOutput.image` and a new request's input images are filled in-process, and on the
wire each array travels as a separate frame.
"""

from __future__ import annotations

from typing import Any

import msgspec

from engine.contract.sampling_params import SamplingParams


class NewRequest(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Everything a worker needs to start a request (sent once, on its first step)."""

    request_id: str
    params: SamplingParams
    prompt: str | None = None
    negative_prompt: str | None = None
    class_label: int | None = None
    # Input images (engine/contract/input_images.py): a uint8 or float32 array, or a list of
    # them; never encoded by msgspec, the wire sends each as an extra frame.
    image: Any = None
    mask_image: Any = None
    seed: int = 0  # resolved by the engine, so every rank draws the same noise


class StepBatch(msgspec.Struct, tag="step", kw_only=True, omit_defaults=True):
    """One denoising step for every request named in it."""

    step_id: int
    new: list[NewRequest] = []
    cached: list[str] = []
    # Requests whose state the workers must drop (aborted, or failed on the engine side).
    drop: list[str] = []


class StepOutput(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What one request did in one step. Only finished requests carry an image."""

    request_id: str
    step: int  # steps completed so far
    num_steps: int
    finished: bool = False
    error: str | None = None
    # float32 array (1, H, W, 3) in [0, 1], as diffusers' output_type="np". Never encoded by
    # msgspec: the wire sends it as an extra frame.
    image: Any = None


class StepResults(msgspec.Struct, tag="results", kw_only=True, omit_defaults=True):
    step_id: int
    outputs: list[StepOutput] = []
    # Seconds the runner spent on the batch (encode + forward + scheduler + decode).
    execute_s: float = 0.0
    # Seconds the reporting worker sat idle between its previous batch and this one, when the
    # previous one left requests running there; None otherwise (a gap between requests).
    idle_s: float | None = None


# -- worker control (ZeroMQ only) ------------------------------------------------------------
class Shutdown(msgspec.Struct, tag="shutdown"):
    pass


class StateQuery(msgspec.Struct, tag="state_query"):
    pass


class WorkerReady(msgspec.Struct, tag="ready"):
    rank: int
    info: dict[str, Any] = {}


class WorkerFailed(msgspec.Struct, tag="failed"):
    """A worker could not start or hit an error outside any request; the text reaches the user."""

    rank: int
    error: str


class StateReply(msgspec.Struct, tag="state"):
    rank: int
    request_ids: list[str] = []


ToWorker = StepBatch | Shutdown | StateQuery
FromWorker = StepResults | WorkerReady | WorkerFailed | StateReply
