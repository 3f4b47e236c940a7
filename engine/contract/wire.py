"""Encoding messages for ZeroMQ: msgpack Structs plus zero-copy frames for arrays.

Frame 0 is the msgpack encoding of one Struct; every numpy array inside it is replaced by a
small reference `{"__array__": i, "dtype": ..., "shape": [...]}` and its buffer goes out as
frame i+1 without a copy. Decoding is typed (`msgspec` checks every field against the expected
Struct union) and never unpickles anything, so a malformed or hostile message is a
`WireError`, not code execution.
"""

from __future__ import annotations

from typing import Any

import msgspec
import numpy as np

ARRAY_KEY = "__array__"
ALLOWED_DTYPES = {"float32", "float16", "uint8", "int64", "bool"}


class WireError(ValueError):
    """A message that does not decode to what this socket accepts."""


class Encoder:
    def __init__(self) -> None:
        self._frames: list[Any] = []
        self._encoder = msgspec.msgpack.Encoder(enc_hook=self._enc_hook)

    def _enc_hook(self, obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            array = np.ascontiguousarray(obj)
            self._frames.append(memoryview(array).cast("B") if array.size else b"")  # no cast of a zero shape
            return {ARRAY_KEY: len(self._frames) - 1, "dtype": str(array.dtype), "shape": list(array.shape)}
        raise TypeError(f"cannot send {type(obj).__name__} over the wire")

    def encode(self, message: msgspec.Struct) -> list[Any]:
        self._frames = []
        try:
            head = self._encoder.encode(message)
            return [head, *self._frames]
        finally:
            self._frames = []


class Decoder:
    def __init__(self, message_type: Any, max_frames: int = 64):
        self._decoder = msgspec.msgpack.Decoder(message_type)
        self.max_frames = max_frames

    def decode(self, frames: list[Any]) -> Any:
        if not frames or len(frames) > self.max_frames:
            raise WireError(f"expected 1 to {self.max_frames} frames, got {len(frames)}")
        try:
            message = self._decoder.decode(_buffer(frames[0]))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise WireError(f"malformed message: {exc}") from exc
        if len(frames) > 1:
            _attach_arrays(message, [_buffer(f) for f in frames[1:]])
        return message


def _buffer(frame: Any) -> Any:
    return frame.buffer if hasattr(frame, "buffer") else frame


def _attach_arrays(message: Any, buffers: list[Any]) -> None:
    """Replace array references (dicts in `Any` fields) by arrays over the received buffers."""
    for field in getattr(message, "__struct_fields__", ()):
        value = getattr(message, field)
        if _is_ref(value):
            setattr(message, field, _array(value, buffers))
        elif isinstance(value, list):  # Structs, or arrays (a request's list of input images)
            for i, item in enumerate(value):
                if _is_ref(item):
                    value[i] = _array(item, buffers)
                else:
                    _attach_arrays(item, buffers)
        elif isinstance(value, msgspec.Struct):
            _attach_arrays(value, buffers)


def _is_ref(value: Any) -> bool:
    return isinstance(value, dict) and ARRAY_KEY in value


def _array(ref: dict, buffers: list[Any]) -> np.ndarray:
    index, dtype, shape = ref.get(ARRAY_KEY), ref.get("dtype"), ref.get("shape")
    if not isinstance(index, int) or not 0 <= index < len(buffers) or dtype not in ALLOWED_DTYPES:
        raise WireError(f"bad array reference {ref!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise WireError(f"bad array shape {shape!r}")
    try:
        array = np.frombuffer(buffers[index], dtype=dtype)
    except ValueError as exc:  # a frame cut short of a whole item
        raise WireError(f"array frame {index} does not hold whole {dtype} items: {exc}") from None
    if array.size != int(np.prod(shape)):
        raise WireError(f"array frame holds {array.size} items, shape {shape} needs {int(np.prod(shape))}")
    return array.reshape(shape)
