"""FLUX, Stable Diffusion 3 and Z-Image served through the generic diffusers adapter: each
request's output equals the diffusers pipeline class loaded from the same directory, alone and
co-batched with requests that join at different steps with different step counts, scales,
sizes and prompt lengths; and their forwards really are joined."""

from __future__ import annotations

import diffusers
import pytest

from engine import EngineClient, Omni, SamplingParams
from pipelines.diffusers_adapter import DiffusersAdapterPipeline
from tests.conftest import run_staggered
from tests.service_peers import ServerProcess
from tests.test_diffusers_adapter import adapter_threads, check_output

# preset -> (diffusers class, [(join at step, prompt, params)]): at least four requests each,
# mixing CFG on and off, sizes, step counts and prompt lengths.
CASES = {
    "tiny-flux": (
        diffusers.FluxPipeline,
        [
            (0, {"prompt": "a red fox in the snow"}, SamplingParams(num_inference_steps=4, guidance_scale=3.5, seed=1)),
            (
                1,
                {"prompt": "an old harbour town with many small boats at dawn", "negative_prompt": "blurry"},
                SamplingParams(num_inference_steps=5, true_cfg_scale=3.0, seed=2),
            ),
            (1, {"prompt": "a cat"}, SamplingParams(num_inference_steps=3, guidance_scale=5.0, seed=3)),
            (2, {"prompt": "a tower"}, SamplingParams(num_inference_steps=3, seed=4, height=32, width=48)),
            (
                2,
                {"prompt": "a ship"},
                SamplingParams(num_inference_steps=2, seed=5, pipeline_args={"max_sequence_length": 64}),
            ),
        ],
    ),
    "tiny-sd3": (
        diffusers.StableDiffusion3Pipeline,
        [
            (
                0,
                {"prompt": "a red fox in the snow", "negative_prompt": "blurry"},
                SamplingParams(num_inference_steps=4, guidance_scale=5.0, seed=1),
            ),
            (
                1,
                {"prompt": "an old harbour town with many small boats at dawn"},
                SamplingParams(num_inference_steps=5, seed=2),
            ),
            (1, {"prompt": "a cat"}, SamplingParams(num_inference_steps=3, guidance_scale=1.0, seed=3)),
            (
                2,
                {"prompt": "a tower", "negative_prompt": "fog"},
                SamplingParams(num_inference_steps=3, seed=4, height=32),
            ),
        ],
    ),
    "tiny-z-image": (
        diffusers.ZImagePipeline,
        [
            (0, {"prompt": "a red fox in the snow"}, SamplingParams(num_inference_steps=4, guidance_scale=4.0, seed=1)),
            (
                1,
                {"prompt": "an old harbour town with many small boats at dawn", "negative_prompt": "dark"},
                SamplingParams(num_inference_steps=5, guidance_scale=2.0, seed=2),
            ),
            (1, {"prompt": "a cat"}, SamplingParams(num_inference_steps=3, guidance_scale=0.0, seed=3)),
            (2, {"prompt": "a tower"}, SamplingParams(num_inference_steps=3, seed=4, height=48, width=32)),
        ],
    ),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def family(request, _preset_cache, tmp_path_factory):
    from pipelines.presets import export_preset

    name = request.param
    path = export_preset(name, tmp_path_factory.mktemp(name) / name, preset_size=True)
    with Omni(model=str(path), max_num_seqs=8, executor="inproc") as omni:
        pipe = diffusers.DiffusionPipeline.from_pretrained(str(path))
        pipe.set_progress_bar_config(disable=True)
        yield name, omni, pipe


def _params(params: SamplingParams) -> SamplingParams:
    import msgspec

    return msgspec.structs.replace(params, output_type="np")


def test_family_alone_matches_diffusers(family):
    name, omni, pipe = family
    diffusers_class, cases = CASES[name]
    assert type(pipe) is diffusers_class and omni.core.model_info.family is DiffusersAdapterPipeline
    _, prompt, params = cases[1]
    (output,) = omni.generate([prompt], _params(params), use_tqdm=False)
    check_output(omni, pipe, output, prompt, _params(params))
    assert output.metrics.num_steps == params.num_inference_steps


def test_family_co_batched_with_staggered_joins_matches_diffusers(family):
    name, omni, pipe = family
    core = omni.core
    runner_pipeline = core.executor.runner.pipeline
    cases = [(join, prompt, _params(params)) for join, prompt, params in CASES[name][1]]
    calls, forwards = runner_pipeline.forward_calls, runner_pipeline.forwards_run
    requests = [(join, core.make_request(prompt, params)) for join, prompt, params in cases]
    finished = run_staggered(core, requests)
    assert len(finished) == len(cases)
    for (_, request), (_, prompt, params) in zip(requests, cases, strict=True):
        check_output(omni, pipe, finished[request.request_id], prompt, params)
    calls, forwards = runner_pipeline.forward_calls - calls, runner_pipeline.forwards_run - forwards
    # Joined where the inputs allow (sizes, text lengths and FLUX's separate true-CFG call keep
    # some apart); run alone, every call would be a forward of its own.
    assert forwards < 0.8 * calls, (calls, forwards)
    assert core.executor.state_ids() == [] and adapter_threads() == []


def test_server_and_client_serve_an_adapter_family(family):
    """The ZeroMQ server and EngineClient need nothing new for an adapter family: the request,
    pipeline_args included, crosses the wire and comes back equal to diffusers."""
    name, omni, pipe = family
    if name != "tiny-flux":
        pytest.skip("one family is enough for the wire")
    server = ServerProcess(omni.core.model_info.path).wait_ready()
    try:
        prompt = {"prompt": "a ship at sea"}
        params = SamplingParams(
            num_inference_steps=3, seed=6, pipeline_args={"max_sequence_length": 32}, output_type="np"
        )
        with EngineClient(server.address) as client:
            (output,) = client.generate([prompt], params, use_tqdm=False)
            (bad,) = client.generate([prompt], SamplingParams(pipeline_args={"no_such": 1}), use_tqdm=False)
    finally:
        server.stop()
    check_output(omni, pipe, output, prompt, params)
    assert "FluxPipeline takes no argument 'no_such'" in bad.error


def test_request_threads_encoding_at_once_get_their_own_tokenizer_settings(family):
    """Request threads share the loaded tokenizers, and diffusers calls one tokenizer with
    padding="max_length" and again with padding="longest"; unserialized, concurrent calls swapped
    those settings (a 77-token prompt came back 29 long: a shape error or a wrong image)."""
    import threading

    from engine.contract.messages import NewRequest
    from pipelines.tokenizer_lock import SerializedTokenizer

    name, omni, _ = family
    adapter = omni.core.executor.runner.pipeline
    copies = [
        adapter.prepare_encode(NewRequest(request_id=f"tok-{i}", params=SamplingParams(), prompt="x", seed=i)).pipe
        for i in range(8)
    ]
    names = [n for n, value in vars(copies[0]).items() if isinstance(value, SerializedTokenizer)]
    assert names, f"{name}: no tokenizer of the request's pipeline copy is serialized"
    text, wrong = "a photo of a cat " * 3, []

    def encode(i: int) -> None:
        tokenizer = getattr(copies[i], names[0])
        for j in range(150):
            if (i + j) % 2:
                ids = tokenizer(text, padding="max_length", max_length=64, truncation=True).input_ids
                if len(ids) != 64:
                    wrong.append(("max_length", len(ids)))
            else:
                ids = tokenizer(text, padding="longest").input_ids
                if len(ids) == 64:
                    wrong.append(("longest", len(ids)))

    threads = [threading.Thread(target=encode, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert wrong == []
