"""Several images per prompt, and the settings carried in each image, through every front door:
image i equals diffusers' image for seed + i, the N images come back as one output, and PIL
images keep prompt, seed, steps, scales and model as PNG text chunks."""

from __future__ import annotations

import asyncio
import logging
import re

import msgspec
import numpy as np
import pytest
from PIL import Image

from engine import AsyncEngine, AsyncEngineClient, EngineClient, Omni, SamplingParams
from engine.cli import main
from tests.conftest import diffusers_reference
from tests.service_peers import ServerProcess

PROMPT = {"prompt": "a red fox in the snow", "negative_prompt": "blurry"}
THREE = SamplingParams(num_inference_steps=3, seed=11, num_images_per_prompt=3, output_type="np")


@pytest.fixture(scope="module")
def omni(qwen_dir):
    with Omni(model=str(qwen_dir), max_num_seqs=8, executor="inproc") as omni:
        yield omni


@pytest.fixture(scope="module")
def pipe(qwen_dir):
    import diffusers

    pipe = diffusers.DiffusionPipeline.from_pretrained(str(qwen_dir))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_image_i_equals_diffusers_with_seed_plus_i(omni, pipe):
    (output,) = omni.generate([PROMPT], THREE, use_tqdm=False)
    assert output.error is None and output.images.shape == (3, 64, 64, 3) and output.seed == 11
    size = (omni.core.model_info.default_height, omni.core.model_info.default_width)
    for i in range(3):
        alone = msgspec.structs.replace(THREE, seed=11 + i, num_images_per_prompt=1)
        np.testing.assert_allclose(output.images[i], diffusers_reference(pipe, PROMPT, alone, size)[0], atol=1e-4)


def test_images_of_several_prompts_share_step_batches(omni):
    steps = omni.core.stats.batches
    outputs = omni.generate(["a", "b"], SamplingParams(num_inference_steps=4, seed=1, num_images_per_prompt=2))
    assert [len(o.images) for o in outputs] == [2, 2]
    assert omni.core.stats.batches - steps <= 4 + 1  # four images, one batch per step


def test_pil_images_carry_their_settings(omni, tmp_path):
    params = SamplingParams(num_inference_steps=2, seed=3, true_cfg_scale=2.5, num_images_per_prompt=2)
    (output,) = omni.generate([PROMPT], params, use_tqdm=False)
    for i, image in enumerate(output.images):
        image.save(tmp_path / f"{i}.png")
        text = Image.open(tmp_path / f"{i}.png").text
        assert text["seed"] == str(3 + i) and text["prompt"] == PROMPT["prompt"]
        assert text["negative_prompt"] == "blurry" and text["true_cfg_scale"] == "2.5" and text["steps"] == "2"
        assert text["model"] == str(omni.model)


def test_progress_counts_steps_for_one_prompt_and_prompts_for_several(omni, capsys):
    omni.generate([PROMPT], SamplingParams(num_inference_steps=3, seed=1, num_images_per_prompt=2))
    one = capsys.readouterr().err
    assert "6/6" in one and "step" in one
    omni.generate(["a", "b", "c"], SamplingParams(num_inference_steps=2, seed=1))
    many = capsys.readouterr().err
    assert "3/3" in many and "req" in many


def test_cfg_without_a_negative_prompt_warns_once(omni, caplog):
    from pipelines import model_info

    model_info._warned.clear()
    with caplog.at_level(logging.WARNING, logger="stepweave"):
        omni.generate(["a", "b"], SamplingParams(num_inference_steps=2, true_cfg_scale=7.0), use_tqdm=False)
        omni.generate([PROMPT], SamplingParams(num_inference_steps=2, true_cfg_scale=7.0), use_tqdm=False)
    warnings = [r.getMessage() for r in caplog.records if "negative prompt" in r.getMessage()]
    assert len(warnings) == 1 and "true_cfg_scale > 1 has no effect without a negative prompt" in warnings[0]


def test_a_seed_too_large_for_its_images_is_refused(omni):
    (output,) = omni.generate(["a"], SamplingParams(seed=2**63 - 2, num_images_per_prompt=3), use_tqdm=False)
    assert "SamplingParams.seed must be an integer in [0, 9223372036854775805]" in output.error


async def test_async_engine_streams_one_request_for_all_images(qwen_dir):
    async with AsyncEngine(model=str(qwen_dir), executor="inproc") as engine:
        outputs = [out async for out in engine.generate(PROMPT, THREE, request_id="fox")]
        assert all(o.request_id == "fox" for o in outputs)
        assert [o.step for o in outputs if not o.finished] == sorted(o.step for o in outputs if not o.finished)
        final = outputs[-1]
        assert final.finished and final.images.shape == (3, 64, 64, 3)
        long = SamplingParams(num_inference_steps=200, seed=1, num_images_per_prompt=2)
        stream = engine.generate("long", long, request_id="long")
        await stream.__anext__()
        await engine.abort("long")
        rest = [out async for out in stream]
        assert rest[-1].finished and rest[-1].error == "request aborted"
        assert await engine.worker_state_ids() == []


def test_both_clients_get_every_image_with_its_settings_and_the_server_logs_each_request(qwen_dir, capsys):
    server = ServerProcess(qwen_dir, "--log-level", "info").wait_ready()
    try:
        with EngineClient(server.address) as client:
            (sync_out,) = client.generate([PROMPT], msgspec.structs.replace(THREE, output_type="pil"), use_tqdm=False)
            client.generate(["plain"], SamplingParams(num_inference_steps=2, seed=1), use_tqdm=False)

        async def stream():
            async with AsyncEngineClient(server.address) as client:
                return [out async for out in client.generate(PROMPT, THREE, request_id="fox")]

        async_outputs = asyncio.run(stream())
        assert main(["status", "--address", server.address]) == 0
        status = capsys.readouterr().out
        log = server.log()
    finally:
        server.stop()
    assert [image.info["seed"] for image in sync_out.images] == ["11", "12", "13"]
    assert sync_out.images[2].info["prompt"] == PROMPT["prompt"]
    final = async_outputs[-1]
    assert final.images.shape == (3, 64, 64, 3)
    np.testing.assert_allclose(final.images, np.stack([np.asarray(i) / 255 for i in sync_out.images]), atol=1 / 255)
    assert "serving" in status and "client session" in status and "requests holding worker state" in status
    lines = re.findall(r"request (\S+) client (\S+): (\d+)/(\d+) steps, [\d.]+ s, (\S+)", log)
    assert len(lines) == 3 and {line[4] for line in lines} == {"ok"}
    assert len({line[1] for line in lines}) == 2  # two clients
