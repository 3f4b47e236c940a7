"""The worker wire: typed msgpack plus zero-copy array frames; anything else is a WireError."""

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.contract.messages import FromWorker, NewRequest, StepBatch, StepOutput, StepResults, ToWorker
from engine.contract.sampling_params import SamplingParams
from engine.contract.wire import Decoder, Encoder, WireError


def test_step_batch_roundtrip():
    batch = StepBatch(
        step_id=3,
        new=[NewRequest(request_id="a", params=SamplingParams(num_inference_steps=5, seed=1), prompt="p", seed=1)],
        cached=["b"],
        drop=["c"],
    )
    assert Decoder(ToWorker).decode(Encoder().encode(batch)) == batch


def test_images_travel_as_separate_frames_and_arrive_equal():
    image = np.random.default_rng(0).random((1, 8, 6, 3), dtype=np.float32)
    results = StepResults(
        step_id=1, outputs=[StepOutput(request_id="a", step=2, num_steps=2, finished=True, image=image)]
    )
    frames = Encoder().encode(results)
    assert len(frames) == 2 and len(bytes(frames[1])) == image.nbytes
    decoded = Decoder(FromWorker).decode(frames)
    assert np.array_equal(decoded.outputs[0].image, image)


def test_input_images_of_new_requests_travel_as_frames_single_or_listed():
    """A new request's image (one array, or a list of them) and mask: one frame each, equal on
    arrival; a frame cut short of its shape, or of a whole item, is a WireError."""
    rng = np.random.default_rng(1)
    uint8, floats = rng.integers(0, 256, (6, 4, 3), dtype=np.uint8), rng.random((5, 7, 3), dtype=np.float32)
    request = NewRequest(
        request_id="a", params=SamplingParams(), prompt="p", image=[uint8, floats], mask_image=uint8[:, :, 0]
    )
    frames = Encoder().encode(StepBatch(step_id=1, new=[request]))
    assert len(frames) == 4 and [len(bytes(f)) for f in frames[1:]] == [uint8.nbytes, floats.nbytes, 24]
    (decoded,) = Decoder(ToWorker).decode(frames).new
    assert np.array_equal(decoded.image[0], uint8) and np.array_equal(decoded.image[1], floats)
    assert np.array_equal(decoded.mask_image, uint8[:, :, 0]) and decoded.image[1].dtype == np.float32
    empty = Encoder().encode(
        StepBatch(step_id=2, new=[NewRequest(request_id="b", params=SamplingParams(), image=uint8[:0])])
    )
    assert Decoder(ToWorker).decode(empty).new[0].image.shape == (0, 4, 3)
    for cut in (bytes(frames[1])[:10], bytes(frames[2])[:7]):
        index = 1 if len(cut) == 10 else 2
        with pytest.raises(WireError):
            Decoder(ToWorker).decode([*frames[:index], cut, *frames[index + 1 :]])


@pytest.mark.parametrize(
    "ref",
    [
        {"__array__": 5, "dtype": "float32", "shape": [1]},
        {"__array__": 0, "dtype": "object", "shape": [1]},
        {"__array__": 0, "dtype": "float32", "shape": [1000]},
        {"__array__": 0, "dtype": "float32", "shape": [-1]},
    ],
)
def test_bad_array_references_are_rejected(ref):
    head = msgspec.msgpack.encode(
        {"type": "results", "step_id": 1, "outputs": [{"request_id": "a", "step": 1, "num_steps": 1, "image": ref}]}
    )
    with pytest.raises(WireError):
        Decoder(FromWorker).decode([head, np.zeros(4, np.float32).tobytes()])


def test_unknown_message_type_and_too_many_frames():
    with pytest.raises(WireError):
        Decoder(ToWorker).decode([msgspec.msgpack.encode({"type": "launch_missiles"})])
    with pytest.raises(WireError):
        Decoder(ToWorker, max_frames=2).decode([b"", b"", b""])
    with pytest.raises(WireError):
        Decoder(ToWorker).decode([])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=64), min_size=1, max_size=3))
def test_random_bytes_never_escape_as_anything_but_wire_errors(frames):
    try:
        Decoder(ToWorker).decode(frames)
    except WireError:
        pass
