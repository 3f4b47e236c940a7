"""The stepweave command line: generate writes images with their settings, shows progress only
on a terminal, and export-preset writes a loadable directory."""

import io
import sys

import diffusers
import numpy as np
from PIL import Image

from engine.cli import main
from pipelines.presets.digit_classifier import DigitClassifier

QUICK = ["--model", "tiny-qwen-image", "--steps", "2", "--executor", "inproc"]


def test_generate_writes_png(tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(["generate", "--prompt", "a lighthouse", "--negative-prompt", "fog", *QUICK, "--output", str(out)])
    captured = capsys.readouterr()
    assert code == 0 and "wrote" in captured.out
    assert "Denoising" not in captured.err  # not a terminal: no bar
    assert Image.open(out).size == (64, 64)


def test_generate_shows_step_progress_on_a_terminal(tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["generate", *QUICK, "--output", str(tmp_path / "x.png")]) == 0
    assert "Denoising" in terminal.getvalue() and "2/2" in terminal.getvalue()


def test_generate_writes_one_file_per_image_with_its_settings(tmp_path, capsys):
    base = ["--prompt", "a harbour", "--negative-prompt", "fog", "--cfg-scale", "3", *QUICK]
    assert main(["generate", *base, "--num-images", "2", "--seed", "5", "--output", str(tmp_path / "m.png")]) == 0
    assert "seeds 5..6" in capsys.readouterr().out
    assert main(["generate", *base, "--seed", "6", "--output", str(tmp_path / "alone.png")]) == 0
    second, alone = Image.open(tmp_path / "m-1.png"), Image.open(tmp_path / "alone.png")
    assert second.text == {
        "prompt": "a harbour",
        "negative_prompt": "fog",
        "seed": "6",
        "steps": "2",
        "true_cfg_scale": "3.0",
        "guidance_scale": "3.0",
        "model": "tiny-qwen-image",
        "software": "stepweave",
    }
    assert Image.open(tmp_path / "m-0.png").text["seed"] == "5"
    # image i is what a single request with seed + i gives (one unit of rounding for batching)
    diff = np.abs(np.asarray(second, dtype=int) - np.asarray(alone, dtype=int))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_readme_first_command_draws_the_named_digit(tmp_path, capsys):
    """README's first command, as a new user runs it: the default model, worker processes."""
    out = tmp_path / "seven.png"
    assert main(["generate", "--prompt", "a handwritten digit seven", "--output", str(out)]) == 0
    image = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)[None] / 255.0
    assert image.shape == (1, 32, 32, 3)
    assert DigitClassifier().predict(image).tolist() == [7]


def test_export_preset_loads_in_diffusers(tmp_path):
    assert main(["export-preset", "tiny-dit", str(tmp_path / "dit")]) == 0
    assert isinstance(diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "dit")), diffusers.DiTPipeline)


def test_export_preset_help_lists_the_presets(capsys):
    from pipelines.presets import PRESETS

    try:
        main(["export-preset", "--help"])
    except SystemExit:
        pass
    out = capsys.readouterr().out
    assert all(name in out for name in PRESETS) and "exit codes" in out


def test_help_shows_defaults_and_bench_help_names_the_command(capsys):
    for args in (["generate", "--help"], ["bench", "--help"]):
        try:
            main(args)
        except SystemExit:
            pass
    out = capsys.readouterr().out
    assert "denoising steps (SamplingParams.num_inference_steps) (default: 20)" in " ".join(out.split())
    assert "usage: stepweave bench" in out


def test_unsupported_and_broken_directories_are_clear_errors(tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    (other / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    assert main(["generate", "--model", str(other), "--executor", "inproc"]) == 2
    assert "stepweave serves QwenImagePipeline, DiTPipeline" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    assert main(["generate", "--model", str(broken), "--executor", "inproc"]) == 2
    assert "model directory is broken" in capsys.readouterr().err


def test_generate_reads_input_images(tmp_path, capsys):
    """--image and --strength (image-to-image), --pipeline-arg: the written image is the one
    diffusers gives for the same file, and the run reports the steps that strength leaves."""
    import torch

    source = tmp_path / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source)
    directory = tmp_path / "img2img"
    assert main(["export-preset", "tiny-flux-img2img", str(directory)]) == 0
    out = tmp_path / "out.png"
    args = ["--model", str(directory), "--executor", "inproc", "--steps", "5", "--height", "64", "--width", "64"]
    args += ["--image", str(source), "--strength", "0.5", "--pipeline-arg", "max_sequence_length=32"]
    assert main(["generate", "--prompt", "a fox", *args, "--seed", "3", "--output", str(out)]) == 0
    assert "(3 steps, seed 3," in capsys.readouterr().out and Image.open(out).text["strength"] == "0.5"
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(directory))
    expected = pipe(
        prompt="a fox",
        image=Image.open(source),
        strength=0.5,
        num_inference_steps=5,
        height=64,
        width=64,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(3),
    ).images[0]
    diff = np.abs(np.asarray(Image.open(out), dtype=int) - np.asarray(expected, dtype=int))
    assert diff.max() <= 1  # one unit of PNG rounding
