"""What `stepweave generate` checks before it starts anything: the output path, the request, and
that the output's format suits the model (a video file for a video model).

Both fail in well under a second with a line naming the flag or field, instead of after the
workers have loaded the model (a bad request) or after the image was generated (a bad path).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from engine.contract.config import EngineConfig


def output_paths(output: str, count: int) -> list[str]:
    """The file(s) --output names: itself for one image, NAME-i.EXT for several. Raises
    ValueError unless the extension is an image format PIL writes and the folder is writable."""
    from PIL import Image

    from engine.video_file import VIDEO_EXTENSIONS

    path = Path(output)
    suffix = path.suffix.lower()
    writable = {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE}
    if suffix not in writable | set(VIDEO_EXTENSIONS):
        shown = repr(path.suffix) if path.suffix else "none"
        raise ValueError(
            f"--output {output!r}: the file extension ({shown}) must be an image format, e.g. .png, or a video "
            f"format ({', '.join(VIDEO_EXTENSIONS)})"
        )
    folder = path.parent
    if not folder.is_dir():
        raise ValueError(f"--output {output!r}: folder {str(folder)!r} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"--output {output!r}: folder {str(folder)!r} is not writable")
    if count == 1:
        return [output]
    return [str(path.with_name(f"{path.stem}-{i}{path.suffix}")) for i in range(count)]


def check_before_start(config: EngineConfig, prompt: Any, params: Any) -> Any:
    """Every check the engine makes at submission, from the model's configs alone (no weights,
    no workers), plus the device check; ValueError names the field. Returns the ModelInfo."""
    from engine.contract.input_images import check_input_images
    from engine.contract.request_fields import request_fields
    from pipelines.model_info import ModelInfo
    from runner.devices import check_devices

    info = ModelInfo.load(config.model, adapter=config.diffusers_adapter)
    params, fields = request_fields(prompt, params)
    check_input_images(fields, config.max_input_pixels)
    info.validate(params, fields)
    check_devices(config)
    return info


def check_output_kind(output: str, info: Any) -> None:
    """A video model writes a video file, an image model an image; MP4 needs imageio's ffmpeg."""
    from engine.video_file import VIDEO_EXTENSIONS

    suffix = Path(output).suffix.lower()
    if info.makes_video and suffix not in VIDEO_EXTENSIONS:
        raise ValueError(
            f"--output {output!r}: {info.pipeline_class} makes videos; name a {' or '.join(VIDEO_EXTENSIONS)} file"
        )
    if not info.makes_video and suffix == ".mp4":
        raise ValueError(f"--output {output!r}: {info.pipeline_class} makes images; name an image file, e.g. .png")
    if suffix == ".mp4":
        try:
            import imageio  # noqa: F401
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise ValueError(
                f"--output {output!r}: writing MP4 needs imageio-ffmpeg (pip install imageio imageio-ffmpeg)"
            ) from None
