"""Messages between `EngineClient`s and the engine server (DEALER <-> ROUTER).

Every message is one msgpack-encoded Struct of a tagged union, decoded with its type on both
sides (never pickle). A client must open with `Hello` (protocol version, optional auth token)
before anything else is served. Final images and a video's frames ride as extra zero-copy frames
(engine/contract/wire.py), and so do a request's input images (a `Generate` may carry up to
2 x MAX_INPUT_IMAGES of them, MAX_INPUT_BYTES in all); every other client message is one small frame.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

import msgspec

from engine.contract.input_images import MAX_INPUT_BYTES, MAX_INPUT_IMAGES
from engine.contract.outputs import RequestMetrics, RequestOutput
from engine.contract.sampling_params import SamplingParams

# Bump on any change to these Structs that an older peer could misread. 2: Output.frames (a
# video), which a version-1 client would drop, reading a finished video as an output without images.
PROTOCOL_VERSION = 2
# Upper bound of one client message (prompts are capped at 20k characters; see model_info).
MAX_CLIENT_MESSAGE_BYTES = 1 << 20
# A message and its input images' frames (image and mask_image, MAX_INPUT_IMAGES each).
MAX_CLIENT_FRAMES = 1 + 2 * MAX_INPUT_IMAGES


RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
ShortText = Annotated[str, msgspec.Meta(max_length=4096)]


# -- client -> server --------------------------------------------------------------------------
# Decoded strictly: an unknown field is an error, not silently dropped (a misspelt option would
# otherwise run the request with its default).
class Hello(msgspec.Struct, tag="hello", kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Opens a session: the server answers `Welcome`, or `Error` (version, auth)."""

    protocol_version: int
    auth_token: ShortText | None = None


class Generate(msgspec.Struct, tag="generate", kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Submit one request; `stream` asks for progress outputs, not just the final one."""

    request_id: RequestId
    params: SamplingParams
    prompt: str | None = None
    negative_prompt: str | None = None
    class_label: int | None = None
    # Input images: references to the frames after this one (engine/contract/input_images.py).
    image: Any = None
    mask_image: Any = None
    stream: bool = True


class Abort(msgspec.Struct, tag="abort", forbid_unknown_fields=True):
    request_id: RequestId


class Ping(msgspec.Struct, tag="ping", forbid_unknown_fields=True):
    """Client heartbeat; also how `health()` asks whether the server still takes requests."""

    seq: int


class StateQuery(msgspec.Struct, tag="state_query", forbid_unknown_fields=True):
    """Debug: which requests the server and the workers still hold state for."""

    seq: int


class Goodbye(msgspec.Struct, tag="goodbye", forbid_unknown_fields=True):
    """The client is closing: abort whatever it still has running."""


ClientMessage = Hello | Generate | Abort | Ping | StateQuery | Goodbye


class RequestRef(msgspec.Struct):
    """Just the request id of a message that failed typed decoding, to route the error back."""

    request_id: RequestId


# -- server -> client --------------------------------------------------------------------------
class Welcome(msgspec.Struct, tag="welcome", kw_only=True):
    protocol_version: int
    model: str
    # The server drops a session that stays silent this long; clients ping well within it.
    client_timeout_s: float
    max_message_bytes: int


class WireMetrics(msgspec.Struct, array_like=True):
    arrival_time: float
    queue_time_s: float | None
    latency_s: float | None
    num_steps: int


class Output(msgspec.Struct, tag="output", kw_only=True, omit_defaults=True):
    """One RequestOutput; `images` (final only) is a float32 array sent as its own frame, and so
    is a video's `frames` (F, H, W, 3); a message carries one of the two, never both."""

    request_id: str
    step: int
    num_steps: int
    finished: bool = False
    error: str | None = None
    seed: int | None = None
    metrics: WireMetrics | None = None
    images: Any = None
    frames: Any = None


class Rejected(msgspec.Struct, tag="rejected", kw_only=True):
    """A request that never entered the engine. kind: "invalid" (bad prompt or parameters),
    "duplicate" (request id already in flight), "overloaded" (this client's in-flight cap),
    "shutting_down" or "dead"."""

    request_id: str
    kind: str
    error: str


class Pong(msgspec.Struct, tag="pong"):
    seq: int
    serving: bool


class StateReply(msgspec.Struct, tag="state", kw_only=True):
    """A session's own requests by id, and everyone's only as counts (ids stay private)."""

    seq: int
    worker_request_ids: list[str]  # this session's requests the workers hold state for
    server_request_ids: list[str]  # this session's requests the server still tracks
    sessions: int
    all_worker_requests: int = 0  # requests of every session the workers hold state for
    all_server_requests: int = 0  # requests of every session the server still tracks


class Error(msgspec.Struct, tag="error", kw_only=True, omit_defaults=True):
    """A message the server would not serve. code: "version", "auth", "no_session",
    "malformed", "oversize", or "state" (a StateQuery failed; `seq` names it)."""

    code: str
    error: str
    seq: int | None = None


ServerMessage = Welcome | Output | Rejected | Pong | StateReply | Error


def oversize_error(body: list, max_message_bytes: int) -> str | None:
    """Why a client message's frames are too large (None when they fit): the message frame
    within max_message_bytes, its input images within MAX_INPUT_BYTES together."""
    if len(body[0]) > max_message_bytes:
        return f"message of {len(body[0])} bytes exceeds {max_message_bytes}"
    images = sum(len(frame) for frame in body[1:])
    if images > MAX_INPUT_BYTES:
        return f"input images of {images} bytes exceed {MAX_INPUT_BYTES} bytes (MAX_INPUT_BYTES)"
    return None


def to_wire(output: RequestOutput, request_id: str) -> Output:
    """A RequestOutput as it travels, under the client's own request id."""
    metrics = output.metrics
    return Output(
        request_id=request_id,
        step=output.step,
        num_steps=output.num_steps,
        finished=output.finished,
        error=output.error,
        seed=output.seed,
        metrics=None
        if metrics is None
        else WireMetrics(metrics.arrival_time, metrics.queue_time_s, metrics.latency_s, metrics.num_steps),
        images=output.images,
        frames=output.frames,
    )


def from_wire(message: Output, images: Any, frames: Any = None) -> RequestOutput:
    metrics = message.metrics
    return RequestOutput(
        message.request_id,
        message.step,
        message.num_steps,
        finished=message.finished,
        images=images,
        error=message.error,
        seed=message.seed,
        metrics=None
        if metrics is None
        else RequestMetrics(metrics.arrival_time, metrics.queue_time_s, metrics.latency_s, metrics.num_steps),
        frames=frames,
    )


# An absolute path (two or more components): what a client sees of it is its last component.
_PATH = re.compile(r"(?<![\w.~])(?:/[\w.+@~-]+)+/([\w.+@~-]+)")


def without_paths(text: str) -> str:
    """`text` with every absolute path cut to its file name: errors sent to clients name no
    server paths (tracebacks and exception messages from workers included)."""
    return _PATH.sub(r"\1", text)
