"""The model registry: a family registered from user code is served end to end, workers included,
and a model no family serves, an input its family does not take, or a layout it cannot run is
refused with a clear error before anything starts."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from engine import EngineConfig, Omni, ParallelConfig, SamplingParams
from pipelines import registry
from tests.conftest import diffusers_reference
from tests.toy_family import PIPELINE_CLASS, NegativeQwenImageStepPipeline


@pytest.fixture(scope="module")
def negative_dir(qwen_dir, tmp_path_factory):
    """The tiny Qwen-Image weights under a pipeline class name stepweave does not know."""
    path = tmp_path_factory.mktemp("negative") / "model"
    shutil.copytree(qwen_dir, path)
    index = json.loads((path / "model_index.json").read_text())
    index["_class_name"] = PIPELINE_CLASS
    (path / "model_index.json").write_text(json.dumps(index))
    return path


@pytest.fixture
def registered():
    registry.register_family(PIPELINE_CLASS, NegativeQwenImageStepPipeline)
    yield
    registry._FAMILIES.pop(PIPELINE_CLASS, None)


def test_unregistered_pipeline_class_is_refused_naming_what_is_served(negative_dir):
    with pytest.raises(ValueError) as excinfo:
        Omni(model=str(negative_dir), executor="inproc")
    assert str(excinfo.value) == (
        "stepweave serves QwenImagePipeline, DiTPipeline and, through its diffusers adapter, pipelines with a "
        f"transformer or transformer_2 and callback_on_step_end; this model is a '{PIPELINE_CLASS}' "
        "(not a diffusers pipeline class)"
    )


@pytest.mark.parametrize("executor", ["inproc", "mp"])
def test_registered_family_is_picked_up_from_model_index(registered, negative_dir, qwen_dir, executor):
    import diffusers

    params = SamplingParams(num_inference_steps=2, seed=3, height=32, width=32, output_type="np")
    with Omni(model=str(negative_dir), executor=executor) as omni:
        assert omni.core.model_info.family is NegativeQwenImageStepPipeline
        (output,) = omni.generate(["a red fox"], params, use_tqdm=False)
    assert output.ok, output.error
    pipe = diffusers.QwenImagePipeline.from_pretrained(str(qwen_dir))
    pipe.set_progress_bar_config(disable=True)
    expected = diffusers_reference(pipe, {"prompt": "a red fox"}, params)
    np.testing.assert_allclose(output.images, 1.0 - expected, atol=1e-4)


def test_family_declares_its_inputs_and_layouts(registered, negative_dir, dit_dir):
    with Omni(model=str(negative_dir), executor="inproc") as omni:
        (output,) = omni.generate([{"prompt": "a fox", "class_label": 3}], SamplingParams(num_inference_steps=2))
    assert output.error == (
        "ValueError: class_label is not an input of negative-qwen-image models; they take prompt, negative_prompt"
    )
    with pytest.raises(ValueError, match="supports qwen-image models, not negative-qwen-image"):
        Omni(model=str(negative_dir), executor="mp", parallel_config=ParallelConfig(pipeline_parallel_size=2))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"max_num_seqs": 0}, r"EngineConfig.max_num_seqs must be an integer in \[1, 4096\], got 0"),
        ({"executor": "threads"}, r"EngineConfig.executor must be one of \('mp', 'inproc'\), got 'threads'"),
        ({"max_waiting": -1}, r"EngineConfig.max_waiting must be an integer in \[0, "),
        ({"max_input_images_mb": 10}, r"EngineConfig.max_input_images_mb must be an integer in \[64, "),
        ({"async_scheduling": "yes"}, "EngineConfig.async_scheduling must be true, false or null"),
        (
            {"executor": "inproc", "parallel_config": ParallelConfig(cfg_parallel_size=2)},
            "executor='inproc' runs a single rank",
        ),
        ({"parallel_config": ParallelConfig(cfg_parallel_size=0)}, r"ParallelConfig.cfg_parallel_size must be"),
        (
            {"scheduling_policy": "edf"},
            r"EngineConfig.scheduling_policy must be one of \('fcfs', 'priority', 'deadline'\)",
        ),
        ({"priority_aging_s": 0}, r"EngineConfig.priority_aging_s must be seconds in \(0, 86400\], got 0"),
        ({"deadline_admission": "drop"}, r"EngineConfig.deadline_admission must be one of \('reject', 'best_effort'\)"),
        ({"cost_profile": ""}, r"EngineConfig.cost_profile must be null, 'measure' or a JSON profile path"),
    ],
)
def test_engine_config_names_the_bad_field(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig.of("tiny-qwen-image", **options)


def test_engine_config_is_one_object_for_every_front_door():
    config = EngineConfig.of("tiny-qwen-image", max_num_seqs=3)
    assert EngineConfig.of(config) is config
    assert EngineConfig.of(config, executor="inproc").executor == "inproc"
    with pytest.raises(TypeError, match=r"unknown engine option\(s\) \['max_seqs'\]"):
        EngineConfig.of("tiny-qwen-image", max_seqs=3)
