"""`POST /v1/images/edits` on `stepweave serve --http`: the official `openai` client and raw
multipart uploads against a real server process for tiny Kontext, compared with `Omni`; bad
uploads are refused with a 400 naming the field while the server keeps serving; the gateway
forwards edits.

One server for the module (in-process executor, --max-input-pixels 96x96, a 300 kB upload limit).
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from engine import Omni, SamplingParams
from tests.service_peers import GatewayProcess, ServerProcess
from tests.test_image_inputs import kontext_args, picture

pytestmark = pytest.mark.slow

MAX_PIXELS = 96 * 96
MAX_UPLOAD = 300_000
KONTEXT = kontext_args(64, 64)  # through a form: pipeline_args[max_area]=4096, pipeline_args[_auto_resize]=false


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def kontext_dir(_preset_cache, tmp_path_factory):
    from pipelines.presets import export_preset

    return export_preset("tiny-flux-kontext", tmp_path_factory.mktemp("kontext") / "kontext", preset_size=True)


@pytest.fixture(scope="module")
def server(kontext_dir):
    proc = ServerProcess(
        kontext_dir,
        "--http",
        "127.0.0.1:0",
        "--max-input-pixels",
        str(MAX_PIXELS),
        "--max-upload-bytes",
        str(MAX_UPLOAD),
    )
    try:
        yield proc.wait_ready()
        assert proc.proc.poll() is None, "the shared server died during the tests"
        assert "HTTP generation failed" not in proc.log(), proc.log()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, timeout=60) as client:
        yield client


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_openai_client_edit_equals_omni_pil_output(server, kontext_dir):
    source = picture(64, 64, 31)
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key="unused")
    response = client.images.edit(
        model=kontext_dir.name,
        image=("fox.png", png(source), "image/png"),
        prompt="make the fox blue",
        n=2,
        extra_body={"num_inference_steps": 3, "seed": 17, "guidance_scale": 3.0, "pipeline_args": KONTEXT},
    )
    params = SamplingParams(
        num_inference_steps=3, seed=17, guidance_scale=3.0, num_images_per_prompt=2, pipeline_args=KONTEXT
    )
    with Omni(model=str(kontext_dir), executor="inproc") as omni:
        (expected,) = omni.generate(
            {"prompt": "make the fox blue", "image": Image.fromarray(source)}, params, use_tqdm=False
        )
    assert len(response.data) == 2 and response.size == "64x64"
    for i, (item, image) in enumerate(zip(response.data, expected.images)):
        edited = _decode(item.b64_json)
        assert edited.format == "PNG" and edited.size == (64, 64)
        np.testing.assert_array_equal(np.asarray(edited.convert("RGB")), np.asarray(image))
        assert edited.text["seed"] == str(17 + i)
    # a list, as the openai client sends one (image[]), of one image: the same edit (n=2 again:
    # a batch of one may round differently on CPU)
    listed = client.images.edit(
        image=[("fox.png", png(source), "image/png")],
        prompt="make the fox blue",
        n=2,
        extra_body={"num_inference_steps": 3, "seed": 17, "guidance_scale": 3.0, "pipeline_args": KONTEXT},
    )
    assert [d.b64_json for d in listed.data] == [d.b64_json for d in response.data]


def test_streamed_edit_sends_progress_per_step_then_the_image(http):
    form = {
        "prompt": "paint it red",
        "num_inference_steps": "4",
        "seed": "3",
        "pipeline_args": json.dumps(KONTEXT),  # one JSON object works as well as pipeline_args[NAME]
    }
    files = {"image": ("in.webp", _encoded(picture(48, 64, 5), "WEBP"), "image/webp")}
    with http.stream("POST", "/v1/images/edits", data={**form, "stream": "true"}, files=files) as response:
        assert response.status_code == 200, response.read()
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [e["step"] for e in events if e["type"] == "image_edit.progress"] == [1, 2, 3, 4]
    completed = events[-1]
    assert completed["type"] == "image_edit.completed" and completed["seed"] == 3
    plain = http.post("/v1/images/edits", data=form, files=files)
    assert plain.status_code == 200, plain.text
    assert completed["b64_json"] == plain.json()["data"][0]["b64_json"]


def _encoded(array: np.ndarray, fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def _error(response, param: str | None, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    return error


def test_bad_uploads_are_refused_naming_the_field(http):
    good = _encoded(picture(64, 64, 8), "PNG")
    form = {"prompt": "a fox", "num_inference_steps": "2", "pipeline_args": json.dumps(KONTEXT)}

    def edit(files=None, **fields):
        return http.post("/v1/images/edits", data={**form, **fields}, files=files)

    not_image = edit({"image": ("a.png", b"hello, not a picture", "image/png")})
    assert "not an image" in _error(not_image, "image")["message"]
    assert "truncated" in _error(edit({"image": ("a.png", good[: len(good) // 2], "image/png")}), "image")["message"]
    gif = _encoded(picture(8, 8, 1), "GIF")  # PIL reads GIFs; this server takes PNG, JPEG and WebP
    _error(edit({"image": ("a.gif", gif, "image/gif")}), "image")
    # 97x97 is over --max-input-pixels; a 4096x4096 header is refused before it is decoded
    big = _error(edit({"image": ("a.png", _encoded(picture(97, 97, 2), "PNG"), "image/png")}), "image")
    assert f"at most {MAX_PIXELS} pixels" in big["message"]
    bomb = _encoded(np.zeros((4096, 4096, 3), np.uint8), "PNG")  # ~50 kB of zeros
    assert len(bomb) < MAX_UPLOAD
    _error(edit({"image": ("a.png", bomb, "image/png")}), "image")
    small_mask = _encoded(np.full((32, 32), 255, np.uint8), "PNG")
    wrong_size = edit({"image": ("a.png", good, "image/png"), "mask": ("m.png", small_mask, "image/png")})
    assert "the mask must have the image's size" in _error(wrong_size, "mask")["message"]
    mask = _encoded(np.full((64, 64), 255, np.uint8), "PNG")
    no_masks = edit({"image": ("a.png", good, "image/png"), "mask": ("m.png", mask, "image/png")})
    assert "not an input of FluxKontextPipeline" in _error(no_masks, "mask")["message"]
    two = [("image[]", ("a.png", good, "image/png")), ("image[]", ("b.png", good, "image/png"))]
    assert "takes one" in _error(edit(two), "image")["message"]  # Kontext edits one image, not a batch
    assert _error(edit(), "image")["code"] == "missing_required_parameter"
    _error(edit(image="text, not a file"), "image")
    _error(edit({"image": ("a.png", good, "image/png")}, n="two"), "n")
    _error(edit({"image": ("a.png", good, "image/png")}, strength="1.5"), "strength")
    _error(edit({"image": ("a.png", good, "image/png")}, pipeline_args="[1]"), "pipeline_args")
    _error(edit({"image": ("a.png", good, "image/png")}, colour="blue"), "colour")
    too_big = {"image": ("a.png", b"\0" * (MAX_UPLOAD + 1), "image/png")}
    assert _error(edit(too_big), None, 413)["code"] == "request_too_large"
    _error(http.post("/v1/images/edits", json={"prompt": "a fox"}), None, 415)
    ok = edit({"image": ("a.png", good, "image/png")}, seed="1")  # the server still serves
    assert ok.status_code == 200, ok.text
    assert _decode(ok.json()["data"][0]["b64_json"]).size == (64, 64)


def test_inpainting_mask_of_the_wrong_size_then_a_good_one(_preset_cache, tmp_path_factory):
    """tiny-flux-inpaint: the mask travels as `mask` (converted to L) and must match the image."""
    from pipelines.presets import export_preset

    path = export_preset("tiny-flux-inpaint", tmp_path_factory.mktemp("inpaint") / "inpaint", preset_size=True)
    image, circle = picture(64, 64, 11), np.zeros((64, 64), np.uint8)
    y, x = np.mgrid[0:64, 0:64]
    circle[(y - 32) ** 2 + (x - 32) ** 2 < 400] = 255
    mask_rgb = np.repeat(circle[:, :, None], 3, axis=2)  # an RGB upload of the mask: made L
    form = {"prompt": "a round window", "num_inference_steps": "4", "strength": "0.9", "seed": "12"}
    server = ServerProcess(path, "--http", "127.0.0.1:0").wait_ready()
    try:
        with httpx.Client(base_url=server.http_url, timeout=60) as http:
            files = {"image": ("i.png", png(image), "image/png"), "mask": ("m.png", png(mask_rgb[:32]), "image/png")}
            error = _error(http.post("/v1/images/edits", data=form, files=files), "mask")
            assert "the mask must have the image's size" in error["message"]
            _error(http.post("/v1/images/edits", data=form, files={"image": files["image"]}), "mask")  # required
            files["mask"] = ("m.png", png(mask_rgb), "image/png")
            response = http.post("/v1/images/edits", data=form, files=files)
            assert response.status_code == 200, response.text
    finally:
        server.stop()
    params = SamplingParams(num_inference_steps=4, strength=0.9, seed=12)
    with Omni(model=str(path), executor="inproc") as omni:
        prompt = {"prompt": "a round window", "image": Image.fromarray(image), "mask_image": Image.fromarray(circle)}
        (expected,) = omni.generate(prompt, params, use_tqdm=False)
    edited = _decode(response.json()["data"][0]["b64_json"])
    np.testing.assert_array_equal(np.asarray(edited.convert("RGB")), np.asarray(expected.images[0]))


def test_gateway_forwards_edits_and_the_engines_refusals(server, http):
    """The gateway decodes the upload and re-submits it through AsyncEngineClient: the same PNG
    as the engine server's own HTTP API, and the engine's lower pixel limit still names `image`."""
    form = {"prompt": "a fox", "num_inference_steps": "2", "seed": "9", "pipeline_args": json.dumps(KONTEXT)}
    files = {"image": ("a.jpg", _encoded(picture(64, 64, 4), "JPEG"), "image/jpeg")}
    gateway = GatewayProcess([server.address]).wait_ready()
    try:
        with httpx.Client(base_url=gateway.url, timeout=60) as through:
            routed = through.post("/v1/images/edits", data=form, files=files)
            big = {"image": ("a.png", _encoded(picture(97, 97, 2), "PNG"), "image/png")}
            refused = _error(through.post("/v1/images/edits", data=form, files=big), "image")
    finally:
        gateway.stop()
    assert routed.status_code == 200, routed.text
    direct = http.post("/v1/images/edits", data=form, files=files)
    assert routed.json()["data"][0]["b64_json"] == direct.json()["data"][0]["b64_json"]
    assert f"at most {MAX_PIXELS} pixels" in refused["message"]
