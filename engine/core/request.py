"""The engine's view of one request: what was asked, where it is in its life, and its timings.

The engine never holds a running request's tensors; those live on the workers. This object is
what the step scheduler moves between the waiting queue and the running set.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from engine.contract.input_images import as_list
from engine.contract.messages import NewRequest
from engine.contract.sampling_params import SamplingParams
from engine.core.cost_model import RequestShape


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    ABORTED = "aborted"


@dataclass
class Request:
    request_id: str
    params: SamplingParams
    seed: int
    prompt: str | None = None
    negative_prompt: str | None = None
    class_label: int | None = None
    image: Any = None  # input images, as arrays (engine/contract/input_images.py)
    mask_image: Any = None
    # Who asked (a server session; "" for the embedded front doors): admission takes turns
    # between clients.
    client: str = ""
    # Estimated peak activation memory while it runs (admission keeps the sum within budget).
    memory_bytes: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    first_scheduled_time: float | None = None
    finished_time: float | None = None
    step: int = 0
    num_steps: int = 0
    steps_scheduled: int = 0
    in_flight: int = 0  # step batches holding this request that have not come back yet
    sent_to_workers: bool = False
    last_batch: int = -1  # step id of the last batch that held it (who sat out longest steps next)
    # The id the workers know this incarnation by: the request id, unless an earlier request with
    # that id may still have state or results on their side (then the scheduler makes it unique).
    wire_id: str = ""
    # What it puts into a step batch, for the cost model (set by the engine from the model's shapes).
    shape: RequestShape = field(default_factory=RequestShape)
    # Set by the deadline policy: the deadline on the engine clock (None: best effort), the later
    # one it is ordered by once its own cannot be met (so it still finishes), and whether that
    # has happened.
    deadline_at: float | None = None
    fallback_at: float = 0.0
    late: bool = False

    @property
    def input_bytes(self) -> int:
        """Bytes of input images this request holds until it ends."""
        return sum(a.nbytes for a in (*as_list(self.image), *as_list(self.mask_image)))

    def __post_init__(self) -> None:
        self.num_steps = self.params.num_inference_steps
        self.wire_id = self.wire_id or self.request_id

    def to_new_request(self) -> NewRequest:
        return NewRequest(
            request_id=self.wire_id,
            params=self.params,
            prompt=self.prompt,
            negative_prompt=self.negative_prompt,
            class_label=self.class_label,
            image=self.image,
            mask_image=self.mask_image,
            seed=self.seed,
        )
