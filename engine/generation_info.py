"""The settings that made an image, carried in the image: what other image tools write.

Every PIL image a front door returns gets its request's settings (prompt, negative prompt,
seed, steps, guidance scales, scheduler, size, model) as PNG text chunks, so `image.save("x.png")`
keeps them and `Image.open("x.png").text` reads them back. They are also in `image.info`.
"""

from __future__ import annotations

from typing import Any

from engine.contract.sampling_params import SamplingParams


def generation_text(
    fields: dict[str, Any], params: SamplingParams, seed: int | None, model: str | None
) -> dict[str, str]:
    """Text chunks for one image: only the settings that were given (None means the model's
    default, which `model` identifies)."""
    values: dict[str, Any] = {
        "prompt": fields.get("prompt"),
        "negative_prompt": fields.get("negative_prompt"),
        "class_label": fields.get("class_label"),
        "seed": seed,
        "steps": params.num_inference_steps,
        "true_cfg_scale": params.true_cfg_scale,
        "guidance_scale": params.guidance_scale,
        "strength": params.strength,
        "scheduler": params.scheduler,
        "height": params.height,
        "width": params.width,
        "num_frames": params.num_frames,
        "model": model,
        "software": "stepweave",
    }
    return {key: str(value) for key, value in values.items() if value is not None}


def attach_generation_info(output: Any, fields: dict[str, Any], params: SamplingParams, model: str | None) -> None:
    """Give each PIL image of a finished output its settings; image i has seed + i. Every PIL
    frame of a video carries its video's settings."""
    images = output.images if output.frames is None else output.frames
    if not output.finished or output.error is not None or not isinstance(images, list):
        return
    from PIL import PngImagePlugin

    for index, image in enumerate(images):
        seed = None if output.seed is None else output.seed + (index if output.frames is None else 0)
        text = generation_text(fields, params, seed, model)
        chunks = PngImagePlugin.PngInfo()
        for key, value in text.items():
            chunks.add_itxt(key, value)
        image.info.update(text)
        # Pillow's save() merges an image's own encoderinfo into its options: the PNG writer
        # then writes these chunks without the caller passing pnginfo.
        image.encoderinfo = {**getattr(image, "encoderinfo", {}), "pnginfo": chunks}
