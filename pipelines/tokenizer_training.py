"""A byte-level BPE tokenizer trained in code, shaped like Qwen2's, for the qwen-image presets.

Real Qwen tokenizer files cannot be downloaded, so the presets train a small one on a fixed
built-in corpus. It splits text exactly as `Qwen2Tokenizer` does (same pre-tokenizer, NFC,
byte-level alphabet) so the saved vocab/merges reload into the same tokenizer, and the corpus
holds every word of diffusers' Qwen-Image prompt template, so the template's system prefix is
34 tokens, just like with the real tokenizer (the pipeline drops exactly that many).
"""

from __future__ import annotations

import functools
import json

# Qwen2.5-VL's special tokens, in the order the real vocabulary lists them; the config's
# image/video/vision ids point at some of them, so they must exist even if no image is fed.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Enough merges that every corpus word becomes one token; the trainer stops early anyway.
VOCAB_SIZE = 4096

# Written for this project. The first block carries the prompt template's words in the same
# spelling and spacing as the template, so they train into single tokens.
CORPUS = """\
<|im_start|>system
Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships of the objects and background:<|im_end|>
<|im_start|>user
a small red boat drifting on a calm lake at dawn<|im_end|>
<|im_start|>assistant
A small red boat drifts on a calm lake while the sun rises behind the hills.<|im_end|>
Describe the scene in plain words, then describe the light, the mood and the colors.
The painter chose a warm palette: orange, amber, gold and a deep brown for the shadows.
A lighthouse stands on a cliff at sunset, its beam sweeping over grey waves and white foam.
Two cats sleep on a wooden bench in a quiet garden full of tulips, roses and tall grass.
An astronaut rides a horse across a desert of pink sand under a sky with three moons.
The city at night is a grid of yellow windows, blue neon signs and wet black streets.
A bowl of fruit sits on a table: four apples, two pears, a bunch of grapes and one lemon.
Snow covers the mountain village; smoke rises from chimneys and the roofs are steep and dark.
A portrait of an old fisherman with a grey beard, a knitted cap and kind, tired eyes.
The forest path winds between giant trees whose leaves glow green in the morning mist.
A robot reads a book in a library with tall shelves, brass lamps and a spiral staircase.
Describe the texture of the stone wall, rough and cracked, with moss in every gap.
The shape of the cloud looks like a dragon, long and thin, stretching over the valley.
A cup of coffee beside a laptop, a notebook and a pen on a desk near a bright window.
Children fly kites on a windy beach; the kites are red, yellow, green and purple.
The size of the castle is enormous, with towers, walls, a moat and a wooden bridge.
A watercolor sketch of a harbor with fishing boats, ropes, nets and seagulls overhead.
The text on the sign reads open, written in bold white letters on a blue background.
A spatial layout of the room: the bed on the left, a chair in the corner, a rug in the middle.
Relationships between objects matter: the vase is on the shelf, the shelf is above the sofa.
A quantity of coins spills from a leather bag onto a dusty floor in the attic.
The background is a soft gradient from pale pink at the top to deep violet at the bottom.
A train crosses a stone bridge over a river in autumn, with orange and red leaves falling.
A close photo of a butterfly resting on a flower, its wings patterned with black and blue.
Describe the objects and their colors, then the shape and size of each one, then the light.
An abstract painting made of circles, squares and triangles in primary colors.
A dog runs through a field of sunflowers toward a farmhouse with a red barn.
The market is crowded with stalls of spices, fabrics, lanterns, baskets and fresh bread.
A glass of water on a marble counter, with reflections, highlights and a long shadow.
The quick brown fox jumps over the lazy dog, and the dog does not seem to care at all.
Numbers and dates: 1, 2, 3, 10, 42, 100, 2024; a price of 9.99 and a time of 12:30.
"""


def _pre_tokenizer():
    """Qwen2's regex split then byte-level mapping, so training and use tokenize alike."""
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


@functools.lru_cache(maxsize=1)
def _trained_json() -> str:
    """Train once per process (milliseconds); the result is a tokenizers JSON string."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _pre_tokenizer()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=0,
        show_progress=False,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # One "sentence" per line, with the special tokens cut out: they are added tokens at use time
    # and must not leak their characters into the merges.
    lines = []
    for line in CORPUS.splitlines(keepends=True):
        for special in SPECIAL_TOKENS:
            line = line.replace(special, "\x00")
        lines.extend(piece for piece in line.split("\x00") if piece)
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer.to_str()


def trained_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The trained BPE model as plain Python data (fresh copies; callers may mutate them)."""
    model = json.loads(_trained_json())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def build_qwen_tokenizer():
    """The trained BPE wrapped as transformers' Qwen2 tokenizer (what QwenImagePipeline expects)."""
    from transformers import AddedToken, Qwen2TokenizerFast

    vocab, merges = trained_vocab_and_merges()
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        errors="replace",
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    # Specials the constructor did not register (it only knows eos/pad/unk/bos).
    tokenizer.add_special_tokens(
        {"additional_special_tokens": [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]}
    )
    return tokenizer
