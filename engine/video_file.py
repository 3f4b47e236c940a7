"""Writing a generated video to a file, its format chosen by the file's extension.

`.mp4` is H.264 through imageio's ffmpeg plugin (`imageio-ffmpeg` ships its own ffmpeg binary,
so nothing is needed from the system); `.gif` is an animated GIF written by Pillow, which needs
no extra package. Frames are what a video request returns: a list of PIL images, or a float
array (F, H, W, 3) in [0, 1] rounded as diffusers rounds them for PIL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

VIDEO_EXTENSIONS = (".mp4", ".gif")
DEFAULT_FPS = 16  # Wan's frame rate


def write_video(path: str | Path, frames: Any, fps: int = DEFAULT_FPS) -> None:
    """Write `frames` to `path` as MP4 or GIF (by its extension) at `fps` frames per second."""
    suffix = Path(path).suffix.lower()
    if suffix not in VIDEO_EXTENSIONS:
        raise ValueError(f"a video file must end in {' or '.join(VIDEO_EXTENSIONS)}, got {str(path)!r}")
    pixels = _uint8_frames(frames)
    if suffix == ".gif":
        from PIL import Image

        images = [Image.fromarray(frame) for frame in pixels]
        # GIF stores delays in hundredths of a second; Pillow takes milliseconds.
        images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
        return
    import imageio.v2 as imageio

    # yuv420p (what players expect) needs even sides; stepweave's sizes are multiples of 16.
    with imageio.get_writer(str(path), format="FFMPEG", mode="I", fps=fps, codec="libx264", quality=8) as writer:
        for frame in pixels:
            writer.append_data(frame)


def read_video(path: str | Path) -> np.ndarray:
    """Every frame of a video file as uint8 (F, H, W, 3): how tests and users check what was written."""
    suffix = Path(path).suffix.lower()
    if suffix == ".gif":
        from PIL import Image, ImageSequence

        with Image.open(path) as gif:
            return np.stack([np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(gif)])
    import imageio.v2 as imageio

    return np.stack(imageio.mimread(str(path), format="FFMPEG", memtest=False))


def _uint8_frames(frames: Any) -> np.ndarray:
    if isinstance(frames, np.ndarray):
        return (frames * 255).round().clip(0, 255).astype(np.uint8)
    return np.stack([np.asarray(frame.convert("RGB")) for frame in frames])
