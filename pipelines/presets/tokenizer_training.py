"""Tokenizers trained in code on one fixed built-in corpus, shaped like the real ones of each family.

Real tokenizer files cannot be downloaded, so the presets train small ones here (milliseconds):

- Qwen2's byte-level BPE, for qwen-image and (with a Qwen3 chat template) Z-Image. It splits text
  exactly as `Qwen2Tokenizer` does (same pre-tokenizer, NFC, byte-level alphabet) so the saved
  vocab/merges reload into the same tokenizer, and the corpus holds every word of diffusers'
  Qwen-Image prompt template, so the template's system prefix is 34 tokens, just like with the
  real tokenizer (the pipeline drops exactly that many).
- CLIP's lower-cased byte-level BPE with `</w>` word ends, for FLUX and SD3.
- T5's SentencePiece-style Unigram, for FLUX and SD3.

The CLIP and T5 vocabularies are learnt on the words that the transformers class's own
normaliser and pre-tokenizer cut, so what is learnt is what the reloaded tokenizer does.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import string

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


def _corpus_lines() -> list[str]:
    """One "sentence" per line, with Qwen's special tokens cut out: they are added tokens at use
    time and must not leak their characters into the merges."""
    lines = []
    for line in CORPUS.splitlines(keepends=True):
        for special in SPECIAL_TOKENS:
            line = line.replace(special, "\x00")
        lines.extend(piece for piece in line.split("\x00") if piece)
    return lines


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
    tokenizer.train_from_iterator(_corpus_lines(), trainer=trainer)
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


# -- Qwen3 chat (Z-Image) ----------------------------------------------------------------------

# Written for this project: Qwen3's chat layout for plain-text messages. ZImagePipeline renders
# one user turn with add_generation_prompt=True and enable_thinking=True, which adds nothing after
# the assistant header; with enable_thinking=False an empty think block follows, as in Qwen3.
QWEN3_CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking -%}{{ '<think>\\n\\n</think>\\n\\n' }}{%- endif -%}"
    "{%- endif -%}"
)

# Qwen3's reasoning delimiters: added tokens, but not special ones (decoding keeps them).
THINK_TOKENS = ("<think>", "</think>")


def build_qwen3_tokenizer():
    """The Qwen2 BPE with Qwen3's chat template and think tokens (what ZImagePipeline expects)."""
    from transformers import AddedToken

    tokenizer = build_qwen_tokenizer()
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINK_TOKENS])
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


# -- CLIP (FLUX, SD3) --------------------------------------------------------------------------
#
# The CLIP and T5 vocabularies are estimated here in plain Python rather than with the tokenizers
# trainers, because exports must be identical byte for byte in every process: with `</w>` word
# ends the BPE trainer numbers the suffixed symbols in hash-map order, which changes how it breaks
# ties between equally frequent pairs, and the Unigram trainer's scores for kept characters (and
# so the piece order) vary the same way. The Qwen BPE above, whose symbols all come from the
# sorted byte alphabet, comes out the same every time (tests/test_presets.py checks all three).

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"


def _words(tokenizer) -> collections.Counter[str]:
    """How often each word of the corpus occurs, as `tokenizer`'s normaliser and pre-tokenizer
    (a tokenizers.Tokenizer) cut and spell it."""
    words: collections.Counter[str] = collections.Counter()
    for line in _corpus_lines():
        if tokenizer.normalizer is not None:
            line = tokenizer.normalizer.normalize_str(line)
        words.update(word for word, _ in tokenizer.pre_tokenizer.pre_tokenize_str(line))
    return words


@functools.lru_cache(maxsize=1)
def _clip_merges() -> tuple[tuple[str, str], ...]:
    """Byte-pair merges learnt on the corpus as CLIPTokenizer splits it (NFC, lower case, its word
    regex, byte-level symbols), each word's last symbol carrying `</w>`. Each round merges the most
    frequent adjacent pair (ties: the smaller pair) until no pair occurs twice."""
    from transformers import CLIPTokenizer

    words = _words(CLIPTokenizer().backend_tokenizer)
    spelled = {word: [*word[:-1], word[-1] + "</w>"] for word in words}
    merges = []
    while True:
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for word, symbols in spelled.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += words[word]
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        if pairs[best] < 2:
            break
        merges.append(best)
        for word, symbols in spelled.items():
            merged, i = [], 0
            while i < len(symbols):
                if symbols[i : i + 2] == list(best):
                    merged.append(best[0] + best[1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            spelled[word] = merged
    return tuple(merges)


def build_clip_tokenizer():
    """transformers' CLIPTokenizer over the learnt merges, laid out like CLIP's vocabulary: every
    byte symbol bare and with `</w>` (so no word end is ever unknown), the merged symbols in merge
    order, then the start and end tokens last. Pads with the end token, 77 positions at most."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    merges = list(_clip_merges())
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in [*alphabet, *(c + "</w>" for c in alphabet), *(a + b for a, b in merges), CLIP_BOS, CLIP_EOS]:
        vocab.setdefault(symbol, len(vocab))
    return CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=CLIP_EOS,
        bos_token=CLIP_BOS,
        eos_token=CLIP_EOS,
        pad_token=CLIP_EOS,
        model_max_length=77,
    )


# -- T5 (FLUX, SD3) ----------------------------------------------------------------------------

T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # ids 0, 1, 2, as in T5's SentencePiece model
# Unigram pieces kept besides the specials, and the longest piece considered (in characters).
T5_PIECES = 1024
T5_MAX_PIECE = 8


@functools.lru_cache(maxsize=1)
def _t5_pieces() -> tuple[tuple[str, float], ...]:
    """A unigram language model over word pieces of the corpus as T5Tokenizer splits it (words
    on whitespace, `▁` marking each word start): every substring of a word up to T5_MAX_PIECE
    characters is a candidate, scored by the log of its relative frequency; the most frequent
    multi-character pieces are kept, and every character seen plus all printable ASCII, so text
    only falls back to `<unk>` for characters beyond that. Specials first, then by score."""
    from transformers import T5Tokenizer

    counts: collections.Counter[str] = collections.Counter()
    for word, n in _words(T5Tokenizer(extra_ids=0).backend_tokenizer).items():
        for start in range(len(word)):
            for end in range(start + 1, min(len(word), start + T5_MAX_PIECE) + 1):
                counts[word[start:end]] += n
    chars = {piece: n for piece, n in counts.items() if len(piece) == 1}
    for char in string.ascii_letters + string.digits + string.punctuation:
        chars.setdefault(char, 1)
    longer = sorted((piece for piece in counts if len(piece) > 1), key=lambda piece: (-counts[piece], piece))
    kept = {**chars, **{piece: counts[piece] for piece in longer[: T5_PIECES - len(chars)]}}
    total = sum(kept.values())
    scored = sorted(((piece, math.log(n / total)) for piece, n in kept.items()), key=lambda e: (-e[1], e[0]))
    return tuple((special, 0.0) for special in T5_SPECIALS) + tuple(scored)


def build_t5_tokenizer(max_length: int):
    """transformers' T5Tokenizer over the unigram pieces, without sentinel (extra_id) tokens, which
    only matter for T5's span-corruption pretraining."""
    from transformers import T5Tokenizer

    return T5Tokenizer(vocab=list(_t5_pieces()), extra_ids=0, model_max_length=max_length)
