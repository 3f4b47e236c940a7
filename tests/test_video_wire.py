"""A video's frames through every front door: `AsyncEngine`, and `stepweave serve` (worker
processes) with `EngineClient` and `AsyncEngineClient`, as np arrays and PIL frames equal to what
`Omni` gives for the same request; the wire carries them as one zero-copy frame, a video larger
than any client message included, and a malformed one is refused."""

from __future__ import annotations

import asyncio

import msgspec
import numpy as np
import pytest

from engine import AsyncEngine, AsyncEngineClient, EngineClient, Omni, SamplingParams
from engine.contract.wire import Decoder, Encoder
from engine.service.connection import video_and_images
from engine.service.protocol import MAX_CLIENT_MESSAGE_BYTES, Output, ServerMessage
from tests.service_peers import ServerProcess

pytestmark = pytest.mark.slow

PROMPTS = [
    {"prompt": "a red fox running through snow", "negative_prompt": "blurry"},
    {"prompt": "waves on a beach at dawn"},
]
PARAMS = [
    SamplingParams(num_inference_steps=4, seed=11, num_frames=5, output_type="np"),
    SamplingParams(num_inference_steps=3, seed=12, guidance_scale=1.0, output_type="pil"),
]
# 33 frames of 64x64 in float32: 1.6 MB, more than the largest message a client may send.
BIG = SamplingParams(num_inference_steps=2, seed=13, num_frames=33, height=64, width=64, output_type="np")


@pytest.fixture(scope="module")
def wan22(_preset_cache, tmp_path_factory):
    from pipelines.presets import export_preset

    path = export_preset("tiny-wan22", tmp_path_factory.mktemp("wan") / "tiny-wan22", preset_size=True)
    with Omni(model=str(path), executor="inproc") as omni:
        expected = [omni.generate([p], params, use_tqdm=False)[0] for p, params in zip(PROMPTS, PARAMS)]
        (big,) = omni.generate([PROMPTS[1]], BIG, use_tqdm=False)
    return path, expected, big


def assert_same_video(got, want):
    assert got.error is None and want.error is None, (got.error, want.error)
    assert got.images is None
    if isinstance(want.frames, np.ndarray):
        assert got.frames.dtype == np.float32 and got.frames.shape == want.frames.shape
        np.testing.assert_allclose(got.frames, want.frames, atol=1e-5)  # the same steps, batched alike or not
    else:
        assert len(got.frames) == len(want.frames)
        for g, w in zip(got.frames, want.frames, strict=True):
            assert g.size == w.size
            assert np.abs(np.asarray(g, dtype=int) - np.asarray(w, dtype=int)).max() <= 1


def test_frames_come_back_from_the_server_through_both_clients(wan22):
    path, expected, big = wan22
    assert big.frames.nbytes > MAX_CLIENT_MESSAGE_BYTES
    server = ServerProcess(path, executor="mp").wait_ready()
    try:
        with EngineClient(server.address) as client:
            outputs = client.generate(PROMPTS, PARAMS, use_tqdm=False)
            (big_output,) = client.generate([PROMPTS[1]], BIG, use_tqdm=False)

        async def stream():
            async with AsyncEngineClient(server.address) as client:
                return [o async for o in client.generate(PROMPTS[0], PARAMS[0])]

        streamed = asyncio.run(stream())
    finally:
        server.stop()
    for got, want in zip(outputs, expected, strict=True):
        assert_same_video(got, want)
    assert_same_video(big_output, big)
    steps = [o.step for o in streamed]  # progress a slow reader missed is folded into the next
    assert steps == sorted(set(steps)) and steps[-1] == 4 and streamed[-1].finished
    assert all(o.frames is None and not o.finished for o in streamed[:-1])
    assert_same_video(streamed[-1], expected[0])


def test_async_engine_yields_frames(wan22):
    path, expected, _ = wan22

    async def run():
        async with AsyncEngine(model=str(path), executor="inproc") as engine:

            async def last(prompt, params):
                return [o async for o in engine.generate(prompt, params)][-1]

            return await asyncio.gather(*(last(p, params) for p, params in zip(PROMPTS, PARAMS)))

    for got, want in zip(asyncio.run(run()), expected, strict=True):
        assert_same_video(got, want)


def test_a_video_travels_as_one_zero_copy_frame_and_malformed_frames_are_refused():
    video = np.random.default_rng(0).random((9, 32, 32, 3), dtype=np.float32)
    frames = Encoder().encode(Output(request_id="r", step=4, num_steps=4, finished=True, frames=video))
    assert len(frames) == 2 and bytes(frames[1]) == video.tobytes()
    message = Decoder(ServerMessage, max_frames=2).decode([bytes(f) for f in frames])
    images, got = video_and_images(message, "np")
    assert images is None and np.array_equal(got, video)
    pil = video_and_images(message, "pil")[1]
    assert len(pil) == 9 and pil[0].size == (32, 32)
    for bad in (video[0], {"not": "an array"}):
        assert video_and_images(msgspec.structs.replace(message, frames=bad), "np") == (None, None)
    both = msgspec.structs.replace(message, images=video)
    assert video_and_images(both, "np") == (None, None)
