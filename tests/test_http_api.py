"""OpenAI's Images API on `stepweave serve --http`: a real server process on loopback, driven by
the official `openai` client and by raw HTTP, compared with `Omni` for the same requests.

One server for the module (in-process executor, an API key, at most 4 running and 2 waiting
requests so that overload is easy to reach).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from PIL import Image

from engine import EngineClient, Omni, SamplingParams
from tests.service_peers import TOKEN, ServerProcess, metric_samples

pytestmark = pytest.mark.slow

API_KEY = "sk-test-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
# ~14 s of steps on the tiny model: always left or aborted before its end
LONG = {"prompt": "a long one", "size": "512x512", "num_inference_steps": 1000, "seed": 1}


@pytest.fixture(scope="module")
def server(qwen_dir):
    proc = ServerProcess(
        qwen_dir,
        "--http",
        "127.0.0.1:0",
        "--api-key",
        API_KEY,
        "--auth-token",
        TOKEN,
        "--max-num-seqs",
        "4",
        "--max-waiting",
        "2",
        "--max-paused",
        "0",
    )
    try:
        yield proc.wait_ready()
        assert proc.proc.poll() is None, "the shared server died during the tests"
        assert "HTTP generation failed" not in proc.log(), proc.log()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.http_url, headers=AUTH, timeout=60) as client:
        yield client


def _decode(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def _wait_no_requests(server, timeout: float = 10.0):
    """The engine's state, once no request is queued, running or holding worker state."""
    deadline = time.monotonic() + timeout
    with EngineClient(server.address, TOKEN) as client:
        while True:
            state = client.debug_state()
            if not state.all_worker_requests and not state.all_server_requests or time.monotonic() > deadline:
                return state
            time.sleep(0.05)


def test_openai_client_images_equal_omni_pil_output(server, qwen_dir):
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=API_KEY)
    (model,) = [m.id for m in client.models.list()]
    response = client.images.generate(
        model=model,
        prompt="a lighthouse on a cliff",
        n=2,
        size="64x32",
        extra_body={"negative_prompt": "fog", "true_cfg_scale": 2.5, "num_inference_steps": 3, "seed": 21},
    )
    params = SamplingParams(
        num_inference_steps=3, seed=21, true_cfg_scale=2.5, height=32, width=64, num_images_per_prompt=2
    )
    with Omni(model=str(qwen_dir), executor="inproc") as omni:
        (expected,) = omni.generate(
            {"prompt": "a lighthouse on a cliff", "negative_prompt": "fog"}, params, use_tqdm=False
        )
    assert len(response.data) == 2 and response.size == "64x32" and response.output_format == "png"
    for i, (item, image) in enumerate(zip(response.data, expected.images)):
        png = _decode(item.b64_json)
        assert png.format == "PNG" and png.size == (64, 32)
        np.testing.assert_array_equal(np.asarray(png.convert("RGB")), np.asarray(image))
        assert png.text["seed"] == str(21 + i) == str(item.model_extra["seed"])
        assert png.text["negative_prompt"] == "fog" and png.text["model"] == model


def test_jpeg_and_webp_output_formats(http):
    for output_format in ("jpeg", "webp"):
        body = {"prompt": "a fox", "size": "32x32", "num_inference_steps": 2, "seed": 3, "output_format": output_format}
        response = http.post("/v1/images/generations", json={**body, "output_compression": 20})
        assert response.status_code == 200, response.text
        image = _decode(response.json()["data"][0]["b64_json"])
        assert image.format == output_format.upper() and image.size == (32, 32)


def _events(response) -> list[tuple[str, dict]]:
    events, kind = [], None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[len("event: ") :]
        elif line.startswith("data: "):
            events.append((kind, json.loads(line[len("data: ") :])))
    return events


def test_stream_has_one_progress_event_per_step_then_the_image(http):
    # steps of a few ms: the engine coalesces progress the stream has not read yet, and the
    # stream still announces every step
    body = {"prompt": "a fox", "size": "64x64", "num_inference_steps": 6, "seed": 8}
    with http.stream("POST", "/v1/images/generations", json={**body, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        events = _events(response)
    progress = [data["step"] for kind, data in events if kind == "image_generation.progress"]
    assert progress == [1, 2, 3, 4, 5, 6]
    assert all(data["num_steps"] == 6 for kind, data in events[:-1])
    kind, completed = events[-1]
    assert kind == completed["type"] == "image_generation.completed"
    assert completed["size"] == "64x64" and completed["seed"] == 8 and completed["output_format"] == "png"
    plain = http.post("/v1/images/generations", json=body).json()
    assert completed["b64_json"] == plain["data"][0]["b64_json"]  # the same request, the same PNG


def test_openai_client_streams_progress_and_completed_events(server):
    client = openai.OpenAI(base_url=f"{server.http_url}/v1", api_key=API_KEY)
    stream = client.images.generate(
        prompt="a fox", size="32x32", stream=True, extra_body={"num_inference_steps": 2, "seed": 4}
    )
    types = [event.type for event in stream]
    assert types[-1] == "image_generation.completed" and "image_generation.progress" in types


def test_client_leaving_mid_stream_aborts_the_request_at_once(server, http):
    with http.stream("POST", "/v1/images/generations", json={**LONG, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break  # one progress event, then hang up
    left = time.monotonic()
    state = _wait_no_requests(server)
    assert not state.all_worker_requests and not state.all_server_requests, state
    assert time.monotonic() - left < 5


def test_client_leaving_a_plain_request_aborts_it(server, http):
    with pytest.raises(httpx.TimeoutException):
        http.post("/v1/images/generations", json=LONG, timeout=1.0)
    state = _wait_no_requests(server)
    assert not state.all_worker_requests and not state.all_server_requests, state


def test_metrics_parse_and_move_with_requests(http):
    before = metric_samples(http.get("/metrics").text)
    body = {"prompt": "a fox", "size": "32x32", "num_inference_steps": 3, "seed": 5, "n": 2}
    assert http.post("/v1/images/generations", json=body).status_code == 200
    after = metric_samples(http.get("/metrics").text)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert moved("stepweave_requests_total", outcome="ok") == 1
    assert moved("stepweave_images_generated_total") == 2
    assert moved("stepweave_steps_generated_total") == 6
    assert moved("stepweave_request_latency_seconds_count") == 1
    assert moved("stepweave_request_queue_time_seconds_count") == 1
    assert moved("stepweave_step_batch_size_count") >= 3  # at least one batch per step
    assert moved("stepweave_step_duration_seconds_sum") > 0
    assert moved("stepweave_http_responses_total", route="/v1/images/generations", status="200") == 1
    assert after[("stepweave_engine_up", ())] == 1
    assert after[("stepweave_requests_running", ())] == 0 and after[("stepweave_requests_waiting", ())] == 0
    assert 0 <= after[("stepweave_worker_idle_fraction", ())] <= 1


def _error(response, status: int, param: str | None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


OK = {"prompt": "a fox", "size": "32x32", "num_inference_steps": 2, "seed": 1}
BAD_FIELDS = [
    ({"n": 0}, "n"),
    ({"n": 11}, "n"),
    ({"n": "2"}, "n"),
    ({"n": True}, "n"),
    ({"size": "big"}, "size"),
    ({"size": "32x8"}, "size"),
    ({"size": "5000x32"}, "size"),
    ({"size": "40x40"}, "size"),  # not a multiple of what the model's VAE and patches need
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"num_inference_steps": 1001}, "num_inference_steps"),
    ({"num_inference_steps": 2.5}, "num_inference_steps"),
    ({"guidance_scale": -1}, "guidance_scale"),
    ({"true_cfg_scale": 101}, "true_cfg_scale"),
    ({"true_cfg_scale": "high"}, "true_cfg_scale"),
    ({"seed": -1}, "seed"),
    ({"seed": 2**64}, "seed"),
    ({"seed": "x"}, "seed"),
    ({"scheduler": "not a class"}, "scheduler"),
    ({"scheduler": 7}, "scheduler"),
    ({"scheduler": "NoSuchScheduler"}, "scheduler"),
    ({"pipeline_args": {"max_sequence_length": 64}}, "pipeline_args"),  # a hand-split family takes none
    ({"pipeline_args": [1]}, "pipeline_args"),
    ({"output_format": "gif"}, "output_format"),
    ({"output_compression": 101}, "output_compression"),
    ({"response_format": "url"}, "response_format"),
    ({"stream": "yes"}, "stream"),
    ({"prompt": None}, "prompt"),
    ({"prompt": 5}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 32_001}, "prompt"),
    ({"negative_prompt": ["fog"]}, "negative_prompt"),
    ({"priority": "high"}, "priority"),
    ({"priority": 10**7}, "priority"),
    ({"deadline_s": 0}, "deadline_s"),
    ({"deadline_s": "soon"}, "deadline_s"),
    ({"quality": 3}, "quality"),  # accepted-and-ignored fields still have types
    ({"temperature": 0.5}, "temperature"),  # not a field of this API
]


def test_each_bad_field_gets_a_400_naming_it(http):
    for change, param in BAD_FIELDS:
        response = http.post("/v1/images/generations", json={**OK, **change})
        error = _error(response, 400, param)
        assert error["type"] == "invalid_request_error", (change, error)
    assert http.post("/v1/images/generations", json=OK).status_code == 200  # still serving


def test_ignored_openai_fields_are_accepted(http):
    extras = {
        "quality": "hd",
        "style": "vivid",
        "background": "auto",
        "moderation": "low",
        "user": "u1",
        "partial_images": 2,
    }
    response = http.post("/v1/images/generations", json={**OK, **extras, "response_format": "b64_json", "model": None})
    assert response.status_code == 200, response.text


def test_service_levels_are_accepted_as_extensions(http):
    """priority and deadline_s reach SamplingParams (this server's fcfs policy runs them as usual)."""
    response = http.post("/v1/images/generations", json={**OK, "priority": 3, "deadline_s": 120})
    assert response.status_code == 200, response.text


def test_malformed_requests_get_status_and_error_object(server, http, qwen_dir):
    url = "/v1/images/generations"
    _error(http.post(url, json={**OK, "model": "dall-e-3"}), 404, "model", "model_not_found")
    _error(
        http.post(url, content=b'{"prompt": "a fox",', headers={"Content-Type": "application/json"}),
        400,
        None,
        "invalid_json",
    )
    _error(http.post(url, json=["a fox"]), 400, None, "invalid_json")
    _error(
        http.post(url, content=b"prompt=a+fox", headers={"Content-Type": "application/x-www-form-urlencoded"}),
        415,
        None,
    )
    huge = json.dumps({**OK, "user": "x" * (2 << 20)}).encode()
    _error(http.post(url, content=huge, headers={"Content-Type": "application/json"}), 413, None, "request_too_large")
    _error(http.get("/v1/nothing"), 404, None)
    _error(http.get(url), 405, None)
    # Qwen-Image (text-to-image) takes no input image: the engine's own check, naming the field
    picture = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(picture, format="PNG")
    edit = http.post("/v1/images/edits", files={"image": ("a.png", picture.getvalue())}, data={"prompt": "a fox"})
    assert "image is not an input of qwen-image models" in _error(edit, 400, "image")["message"]
    _error(http.post("/v1/images/variations", files={"image": b"png"}), 400, "image", "unsupported")
    with httpx.Client(base_url=server.http_url) as anonymous:
        _error(anonymous.post(url, json=OK), 401, None, "invalid_api_key")
        _error(anonymous.post(url, json=OK, headers={"Authorization": "Bearer wrong"}), 401, None, "invalid_api_key")
        assert anonymous.get("/health").json() == {"status": "ok"}  # health and metrics need no key
    models = http.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == [qwen_dir.name] and models["object"] == "list"
    assert http.post(url, json=OK).status_code == 200


async def test_a_full_queue_answers_429_and_others_keep_running(server):
    """At most 4 running and 2 waiting (--max-waiting 2): further requests get 429 at once."""
    async with httpx.AsyncClient(base_url=server.http_url, headers=AUTH, timeout=60) as client:
        tasks = [
            asyncio.ensure_future(client.post("/v1/images/generations", json={**LONG, "seed": i})) for i in range(9)
        ]
        done, pending = await asyncio.wait(tasks, timeout=5)  # the refusals come at once; the rest run ~14 s
        for task in pending:
            task.cancel()  # the client leaves: the server aborts them
        await asyncio.gather(*pending, return_exceptions=True)
        refused = [task.result() for task in done]
        # Requests that arrive together all count as waiting until the next step schedules them,
        # so at least 9 - 4 - 2 are refused
        assert 3 <= len(refused) <= 7, [r.text for r in refused]
        for response in refused:
            error = _error(response, 429, None, "engine_overloaded")
            assert "max_waiting=2" in error["message"]
        metrics = metric_samples((await client.get("/metrics")).text)
        assert metrics[("stepweave_requests_total", (("outcome", "overloaded"),))] >= 3
    state = _wait_no_requests(server)
    assert not state.all_worker_requests and not state.all_server_requests, state


def test_http_connections_send_without_nagle_delay():
    """Accepted connections inherit TCP_NODELAY from the listening socket: without it every
    response on a kept-alive connection waited ~40 ms for the client's delayed ACK."""
    import socket

    from engine.http.uvicorn_runner import bind_http

    listener = bind_http("127.0.0.1", 0)
    with listener, socket.create_connection(listener.getsockname()[:2]):
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1


def test_sigterm_drains_http_requests_and_refuses_new_ones(qwen_dir):
    """SIGTERM: /health turns 503 and new requests get 503, the running HTTP request still
    finishes with its image, then the server exits 0."""
    proc = ServerProcess(qwen_dir, "--http", "127.0.0.1:0", "--drain-timeout", "120")
    try:
        proc.wait_ready()
        body = {"prompt": "a fox", "size": "256x256", "num_inference_steps": 400, "seed": 2}
        with httpx.Client(base_url=proc.http_url, timeout=120) as http:
            result = {}
            runner = threading.Thread(target=lambda: result.update(r=http.post("/v1/images/generations", json=body)))
            runner.start()
            _wait_running(proc)
            proc.proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while http.get("/health").status_code != 503:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            refused = http.post("/v1/images/generations", json={**body, "num_inference_steps": 2})
            _error(refused, 503, None, "engine_unavailable")
            assert runner.is_alive(), "the request ended before the drain could be seen"
            runner.join(timeout=120)
        assert result["r"].status_code == 200, result["r"].text
        assert proc.proc.wait(timeout=60) == 0, proc.log()
    finally:
        proc.stop()


def _wait_running(proc, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    with EngineClient(proc.address) as client:
        while not client.debug_state().all_worker_requests:
            assert time.monotonic() < deadline, "the HTTP request never started"
            time.sleep(0.05)
