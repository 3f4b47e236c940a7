"""A model family defined outside stepweave, the way a user would add one: a StepPipeline
subclass plus one `register_family` call. It serves Qwen-Image weights under its own pipeline
class name and returns every image as its negative, so a test can tell that the engine and its
workers ran this family and not the built-in one. Worker processes import it by module path."""

from __future__ import annotations

from pipelines.qwen_image import QwenImageStepPipeline

PIPELINE_CLASS = "NegativeQwenImagePipeline"


class NegativeQwenImageStepPipeline(QwenImageStepPipeline):
    name = "negative-qwen-image"
    supports_pipeline_parallel = False

    @classmethod
    def load_diffusers(cls, path, dtype):
        from diffusers import QwenImagePipeline

        return QwenImagePipeline.from_pretrained(str(path), dtype=dtype)

    def post_decode(self, states):
        return [1.0 - image for image in super().post_decode(states)]
