"""Input images through `stepweave serve` (worker processes) and both clients: an edit request's
image crosses the client wire and the worker wire as frames and comes back as Omni's output;
bad input images, hostile frames included, are refused one request at a time while the others
finish and the server keeps serving."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from PIL import Image

from engine import AsyncEngineClient, EngineClient, Omni, SamplingParams
from engine.contract.input_images import MAX_INPUT_BYTES
from engine.service.protocol import Error, Generate, Output, Rejected, Welcome
from tests.service_peers import RawPeer, ServerProcess, no_request_state, wait_state
from tests.test_image_inputs import kontext_args, picture

pytestmark = pytest.mark.slow

MAX_PIXELS = 96 * 96  # the server's --max-input-pixels


def edit(seed: int, **options) -> SamplingParams:
    return SamplingParams(
        num_inference_steps=3, seed=seed, output_type="np", pipeline_args=kontext_args(64, 64), **options
    )


REQUESTS = [
    ({"prompt": "make the fox blue", "image": Image.fromarray(picture(64, 64, 21))}, edit(21)),
    ({"prompt": "paint it", "image": picture(48, 32, 22).astype(np.float32) / 255}, edit(22, guidance_scale=4.0)),
    ({"prompt": "a cat, no input image"}, edit(23)),
]


@pytest.fixture(scope="module")
def kontext(_preset_cache, tmp_path_factory):
    """The preset's directory, Omni's outputs for REQUESTS, and a server with worker processes."""
    from pipelines.presets import export_preset

    path = export_preset("tiny-flux-kontext", tmp_path_factory.mktemp("kontext") / "kontext", preset_size=True)
    with Omni(model=str(path), executor="inproc") as omni:
        expected = omni.generate([p for p, _ in REQUESTS], [s for _, s in REQUESTS], use_tqdm=False)
    assert all(o.error is None for o in expected)
    server = ServerProcess(path, "--max-input-pixels", str(MAX_PIXELS), executor="mp").wait_ready()
    try:
        yield server, expected
    finally:
        server.stop()


def _same(output, expected) -> None:
    assert output.error is None, output.error
    assert output.images.shape == expected.images.shape
    assert float(np.abs(output.images - expected.images).max()) < 1e-4


def test_engine_client_edits_equal_omni(kontext):
    server, expected = kontext
    with EngineClient(server.address) as client:
        outputs = client.generate([p for p, _ in REQUESTS], [s for _, s in REQUESTS], use_tqdm=False)
    for output, reference in zip(outputs, expected, strict=True):
        _same(output, reference)


def test_async_client_streams_an_edit_while_bad_images_are_refused(kontext):
    """A good edit streams to its end beside bad requests: the client refuses what it can check
    itself, the server the rest (its own pixel limit, hostile frames a client would never send)."""
    server, expected = kontext
    prompt, params = REQUESTS[0]

    async def main():
        async with AsyncEngineClient(server.address) as client:
            stream = [o async for o in client.generate(prompt, params)]
            with pytest.raises(ValueError, match=r"prompt\['image'\] has zero size \(4x0\)"):
                async for _ in client.generate({"prompt": "x", "image": np.zeros((0, 4, 3), np.uint8)}):
                    pass
            big = {"prompt": "x", "image": picture(128, 128, 0)}  # within what the client knows
            with pytest.raises(ValueError, match=f"at most {MAX_PIXELS} pixels per input image"):
                async for _ in client.generate(big, edit(1)):
                    pass
            mask = {"prompt": "x", "image": picture(64, 64, 0), "mask_image": picture(32, 32, 0)[:, :, 0]}
            with pytest.raises(ValueError, match="mask must have the image's size"):
                async for _ in client.generate(mask, edit(1)):
                    pass
            state = await wait_state(client, no_request_state)
            assert no_request_state(state), state
            return stream

    stream = asyncio.run(main())
    assert stream[-1].finished and stream[-1].step == 3 and all(o.num_steps == 3 for o in stream)
    _same(stream[-1], expected[0])


def test_hostile_image_frames_fail_alone_and_the_server_keeps_serving(kontext):
    server, expected = kontext
    peer, finals = RawPeer(server.address), []

    def reply(kind):
        """The next reply of `kind`; the good request's final output may come first (kept)."""
        while True:
            message = peer.recv(timeout=60)
            if isinstance(message, Output) and message.finished:
                finals.append(message)
            if isinstance(message, kind):
                return message

    try:
        assert isinstance(peer.hello(token=None), Welcome)
        peer.send(Generate(request_id="good", params=edit(21), stream=False, **_fields(REQUESTS[0][0])))
        image = picture(64, 64, 3)
        frames = peer.encoder.encode(Generate(request_id="cut", params=edit(1), prompt="x", image=image))
        peer.send_raw([frames[0], bytes(frames[1])[: image.nbytes // 2]])  # a truncated image frame
        rejected = reply(Rejected)
        assert rejected.request_id == "cut" and "malformed request: array frame holds 6144 items" in rejected.error
        peer.send_raw([frames[0], bytes(40 << 20), bytes(40 << 20)])  # each frame fits, together too many bytes
        error = reply(Error)
        assert error.code == "oversize" and f"exceed {MAX_INPUT_BYTES} bytes (MAX_INPUT_BYTES)" in error.error
        for request_id, fields, message in [
            ("text", {"image": "photo.png"}, "prompt['image'] must be a PIL image"),
            ("empty", {"image": np.zeros((0, 4, 3), np.uint8)}, "prompt['image'] has zero size (4x0)"),
            ("flat", {"image": np.zeros((64, 64), np.uint8)}, "must be an array of shape (H, W, 3)"),
            ("many", {"image": [image] * 5}, "prompt['image'] must hold 1 to 4 images, got 5"),
            ("huge", {"image": picture(128, 128, 0)}, f"at most {MAX_PIXELS} pixels per input image"),
            ("mask", {"image": image, "mask_image": image[:32, :, 0]}, "mask must have the image's size"),
        ]:
            peer.send(Generate(request_id=request_id, params=edit(1), prompt="x", **fields))
            rejected = reply(Rejected)
            assert rejected.request_id == request_id and rejected.kind == "invalid", rejected
            assert message in rejected.error, (message, rejected.error)
        while not finals:
            reply(Output)
        (output,) = finals
        assert output.request_id == "good" and output.error is None
        assert float(np.abs(output.images - expected[0].images).max()) < 1e-4
    finally:
        peer.close()
    assert server.proc.poll() is None
    with EngineClient(server.address) as client:
        (output,) = client.generate([REQUESTS[2][0]], REQUESTS[2][1], use_tqdm=False)
    _same(output, expected[2])


def _fields(prompt: dict) -> dict:
    """A prompt dict as Generate's fields, PIL images as the uint8 arrays a client sends."""
    return {key: np.asarray(value) if isinstance(value, Image.Image) else value for key, value in prompt.items()}
