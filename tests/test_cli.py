"""The stepweave command line: generate writes an image; export-preset writes a loadable directory."""

import diffusers
import numpy as np
from PIL import Image

from engine.cli import main
from pipelines.presets.digit_classifier import DigitClassifier


def test_generate_writes_png(tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(
        [
            "generate",
            "--model",
            "tiny-qwen-image",
            "--prompt",
            "a lighthouse",
            "--negative-prompt",
            "fog",
            "--steps",
            "2",
            "--executor",
            "inproc",
            "--output",
            str(out),
        ]
    )
    assert code == 0 and "wrote" in capsys.readouterr().out
    assert Image.open(out).size == (64, 64)


def test_readme_first_command_draws_the_named_digit(tmp_path, capsys):
    """README's first command, as a new user runs it: the default model, worker processes."""
    out = tmp_path / "seven.png"
    assert main(["generate", "--prompt", "a handwritten digit seven", "--output", str(out)]) == 0
    image = np.asarray(Image.open(out).convert("RGB"), dtype=np.float32)[None] / 255.0
    assert image.shape == (1, 32, 32, 3)
    assert DigitClassifier().predict(image).tolist() == [7]


def test_generate_reports_bad_input(tmp_path, capsys):
    code = main(["generate", "--steps", "0", "--executor", "inproc", "--output", str(tmp_path / "x.png")])
    assert code == 1 and "num_inference_steps must be an integer in [1, 1000]" in capsys.readouterr().err


def test_export_preset_loads_in_diffusers(tmp_path):
    assert main(["export-preset", "tiny-dit", str(tmp_path / "dit")]) == 0
    assert isinstance(diffusers.DiffusionPipeline.from_pretrained(str(tmp_path / "dit")), diffusers.DiTPipeline)


def test_unknown_model_is_a_clear_error(tmp_path, capsys):
    code = main(["generate", "--model", str(tmp_path), "--executor", "inproc"])
    assert code == 2 and "model must be a preset name" in capsys.readouterr().err


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
