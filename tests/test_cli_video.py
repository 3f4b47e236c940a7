"""`stepweave export-preset` writes a Wan directory diffusers loads, and `stepweave generate`
writes its video as MP4 or GIF by the output's extension, frames as diffusers draws them (up to
the codec's loss); a wrong pairing of model and file format fails before anything runs."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch

from engine.cli import main
from engine.video_file import read_video


@pytest.fixture(scope="module")
def wan22_export(_preset_cache, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "wan22"
    assert main(["export-preset", "tiny-wan22", str(path)]) == 0
    return path


def test_exported_wan_loads_in_diffusers_and_generate_writes_mp4_and_gif(wan22_export, tmp_path, capsys):
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(wan22_export))
    assert type(pipe) is diffusers.WanPipeline and pipe.config.boundary_ratio == 0.875
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(
        prompt="waves at dawn",
        height=32,
        width=48,
        num_frames=5,
        num_inference_steps=3,
        generator=torch.Generator().manual_seed(4),
        output_type="np",
    ).frames[0]
    want = (expected * 255).round()
    args = ["--model", str(wan22_export), "--prompt", "waves at dawn", "--height", "32", "--width", "48"]
    args += ["--num-frames", "5", "--steps", "3", "--seed", "4", "--executor", "inproc"]
    for name, loss in (("clip.mp4", 12.0), ("clip.gif", 4.0)):  # mean error in 0-255 units
        out = tmp_path / name
        assert main(["generate", *args, "--output", str(out)]) == 0
        assert f"wrote {out} (5 frames at 16 fps, 3 steps, seed 4" in capsys.readouterr().out
        frames = read_video(out)
        assert frames.shape == (5, 32, 48, 3)
        assert np.abs(frames.astype(np.float32) - want).mean() < loss, name


def test_video_and_image_outputs_must_suit_the_model(wan22_export, tmp_path, capsys):
    cases = [
        (["--model", str(wan22_export), "--output", str(tmp_path / "x.png")], "WanPipeline makes videos"),
        (["--model", "tiny-qwen-image", "--output", str(tmp_path / "x.mp4")], "QwenImagePipeline makes images"),
        (["--model", str(wan22_export), "--num-frames", "6", "--output", str(tmp_path / "x.mp4")], "must be 4k + 1"),
        (["--model", "tiny-qwen-image", "--num-frames", "5"], "num_frames is for video pipelines"),
        (["--model", str(wan22_export), "--fps", "0", "--output", str(tmp_path / "x.gif")], "--fps must be"),
    ]
    for args, message in cases:
        assert main(["generate", *args, "--executor", "inproc"]) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
