"""Input images of a request (image-to-image, editing, inpainting): checked and made arrays.

A prompt dict's `image` and `mask_image` may be what a diffusers pipeline's `image` argument
takes: a PIL image, a uint8 array (H, W, 3), a float array in [0, 1] ((H, W, 3), or diffusers'
batch of one, (1, H, W, 3)), or a list of them; masks are (H, W) or (H, W, 1). At submission
they become numpy arrays (uint8 for PIL and uint8 input, float32 for float input, keeping a
single image single and a list a list), so they travel to the workers and over the client wire
as zero-copy frames, never pickled. Every limit is checked here, by clients and by the engine,
with an error that names the field and the limit. On the worker, `to_pipeline_input` hands
diffusers what the user would have passed it: uint8 arrays go back to PIL images, so the
pipeline's own PIL path (resizing included) runs, and float arrays stay arrays.
No torch here: remote clients import this module.
"""

from __future__ import annotations

from typing import Any

import numpy as np

IMAGE_KEYS = ("image", "mask_image")
# Images per field: pipelines take one (img2img, Kontext) or a few (Qwen-Image-Edit Plus).
MAX_INPUT_IMAGES = 4
# All input images of one request together, as they travel (uint8: 1 byte per channel value).
MAX_INPUT_BYTES = 64 << 20
# Pixels per image unless the engine sets a lower EngineConfig.max_input_pixels (4096 x 4096).
MAX_INPUT_PIXELS = 4096 * 4096
FLOAT_DTYPES = ("float16", "float32", "float64")


def normalize_images(name: str, value: Any) -> np.ndarray | list[np.ndarray] | None:
    """`value` as arrays (None stays None); ValueError naming prompt[name] for anything else."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        if not 1 <= len(value) <= MAX_INPUT_IMAGES:
            raise ValueError(f"prompt[{name!r}] must hold 1 to {MAX_INPUT_IMAGES} images, got {len(value)}")
        return [_one(f"prompt[{name!r}][{i}]", item, mask=name == "mask_image") for i, item in enumerate(value)]
    return _one(f"prompt[{name!r}]", value, mask=name == "mask_image")


def as_list(value: Any) -> list[np.ndarray]:
    """The arrays of a normalized field, single or listed."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def check_input_images(fields: dict[str, Any], max_pixels: int = MAX_INPUT_PIXELS) -> None:
    """Limits across a normalized request: pixels per image, bytes in all, masks that match."""
    total = 0
    for name in IMAGE_KEYS:
        for i, array in enumerate(as_list(fields.get(name))):
            height, width = array.shape[:2]
            if height * width > max_pixels:
                where = f"prompt[{name!r}]" + (f"[{i}]" if isinstance(fields[name], list) else "")
                raise ValueError(
                    f"{where} is {width}x{height} = {height * width} pixels; this engine accepts at most "
                    f"{max_pixels} pixels per input image (max_input_pixels)"
                )
            total += array.nbytes
    if total > MAX_INPUT_BYTES:
        raise ValueError(
            f"the request's input images hold {total} bytes; at most {MAX_INPUT_BYTES} bytes "
            f"({MAX_INPUT_BYTES >> 20} MiB) travel with one request"
        )
    images, masks = as_list(fields.get("image")), as_list(fields.get("mask_image"))
    if masks and not images:
        raise ValueError("prompt['mask_image'] needs a prompt['image'] to mask")
    if masks and len(masks) not in (1, len(images)):
        raise ValueError(f"prompt['mask_image'] must hold 1 mask or one per image ({len(images)}), got {len(masks)}")
    for i, image in enumerate(images):
        mask = masks[0] if len(masks) == 1 else masks[i] if masks else None
        if mask is not None and mask.shape[:2] != image.shape[:2]:
            raise ValueError(
                f"prompt['mask_image'] is {mask.shape[1]}x{mask.shape[0]} but prompt['image'] is "
                f"{image.shape[1]}x{image.shape[0]}; the mask must have the image's size (width x height)"
            )


def to_pipeline_input(value: Any) -> Any:
    """A normalized field as the diffusers pipeline takes it: uint8 arrays as PIL images (RGB,
    or L for a mask), float arrays as a batch of one in diffusers' numpy layout, (1, H, W, C)
    (what every image processor reads, where (H, W, C) alone is misread by some pipelines);
    single stays single."""
    if value is None:
        return None
    if isinstance(value, list):
        return [to_pipeline_input(item) for item in value]
    if value.dtype == np.uint8:
        from PIL import Image

        return Image.fromarray(np.ascontiguousarray(value), mode="L" if value.ndim == 2 else "RGB")
    batch = value[None] if value.ndim == 3 else value[None, :, :, None]
    return np.array(batch, dtype=np.float32)  # a copy: arrays from the wire are read-only views


def _one(where: str, value: Any, mask: bool) -> np.ndarray:
    array = _from_pil(value, mask) if _is_pil(value) else value
    if not isinstance(array, np.ndarray):
        raise ValueError(
            f"{where} must be a PIL image, a uint8 array or a float array in [0, 1] (or a list of up to "
            f"{MAX_INPUT_IMAGES} of them), got {type(value).__name__}"
        )
    if array.ndim == 4 and array.shape[0] == 1:  # diffusers' batch of one, (1, H, W, C)
        array = array[0]
    shape = "(H, W) or (H, W, 1)" if mask else "(H, W, 3)"
    ok_shape = array.ndim == 2 and mask or array.ndim == 3 and array.shape[2] == (1 if mask else 3)
    if not ok_shape:
        raise ValueError(f"{where} must be an array of shape {shape}, got shape {tuple(array.shape)}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"{where} has zero size ({array.shape[1]}x{array.shape[0]})")
    if array.shape[0] * array.shape[1] > MAX_INPUT_PIXELS:
        raise ValueError(
            f"{where} is {array.shape[1]}x{array.shape[0]} = {array.shape[0] * array.shape[1]} pixels; "
            f"at most {MAX_INPUT_PIXELS} pixels per input image"
        )
    if mask and array.ndim == 3:
        array = array[:, :, 0]  # masks travel as (H, W)
    if array.dtype == np.uint8:
        return _owned(array)
    if array.dtype.name not in FLOAT_DTYPES:
        raise ValueError(f"{where} must be uint8 (0-255) or float in [0, 1], got dtype {array.dtype.name}")
    array = np.asarray(array, dtype=np.float32)
    low, high = float(array.min()), float(array.max())
    if not (np.isfinite(low) and np.isfinite(high) and 0.0 <= low and high <= 1.0):
        raise ValueError(f"{where} is a float array, so its values must lie in [0, 1]; got [{low:g}, {high:g}]")
    return _owned(array)


def _owned(array: np.ndarray) -> np.ndarray:
    """A contiguous array the caller cannot change after submission: a read-only copy, so that
    normalizing it again (each image of num_images_per_prompt, the engine after a client) copies
    nothing; read-only arrays (views of frames received from the wire) are kept as they are."""
    if array.flags.writeable or not array.flags.c_contiguous:
        array = np.array(array, order="C", copy=True)
        array.flags.writeable = False
    return array


def _is_pil(value: Any) -> bool:
    return type(value).__module__.startswith("PIL.") and hasattr(value, "convert") and hasattr(value, "mode")


def _from_pil(image: Any, mask: bool) -> np.ndarray:
    """A PIL image as uint8: RGB for images (what diffusers' VAE input needs), L for masks."""
    return np.asarray(image.convert("L" if mask else "RGB"), dtype=np.uint8)
