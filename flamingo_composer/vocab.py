"""The closed word list shared by the built-in tiny tokenizer and the synthetic data generator.

Every caption word of the synthetic data is one token of the tiny tokenizer: learning on CPU is far faster
when the model does not first have to learn to spell. The generator must only use words listed here
(a test checks it); add words by appending to the lists, never by reordering (token ids would move).
"""

from __future__ import annotations

COLORS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "pink", "cyan", "brown", "gray"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond", "bar"]
SIZES = ["small", "large", "tiny", "big"]
POSITIONS = ["left", "right", "top", "bottom", "center", "upper", "lower", "corner", "middle", "side"]
TEXTURES = ["plain", "striped", "dotted", "checkered", "noisy", "speckled"]
NUMBERS = ["one", "two", "three", "four", "five", "six"]
FUNCTION_WORDS = [
    "a", "an", "the", "of", "on", "in", "at", "with", "and", "is", "are", "there", "this", "it", "to", "near",
    "picture", "photo", "image", "shows", "background", "shape", "shapes", "we", "see", "here", "next", "page",
    "document", "then", "also", "above", "below", "its", "has", "some", "text", "about", "more", "words",
    "story", "today", "look", "these", "color", "colors", "sits", "drawn", "over",
]
PUNCTUATION = [".", ",", "!", "?", ":"]

WORDS: list[str] = COLORS + SHAPES + SIZES + POSITIONS + TEXTURES + NUMBERS + FUNCTION_WORDS + PUNCTUATION

# The easy-vqa data set's words (questions and the 13 answers) and the few-shot prompt words, appended to WORDS
# for the `easy_vqa` built-in tokenizer (tests check every easy-vqa question and answer is in-vocabulary).
EASY_VQA_WORDS = [
    "question", "short", "answer", "output", "what", "does", "contain", "not", "present", "rectangle", "teal",
    "yes", "no", "circle", "triangle", "gray", "red", "green", "blue", "yellow", "black", "brown", "shape",
    "color", "image", "there", "the", "is", "in", "a", "of",
]  # fmt: skip

EOS_TOKEN = "<|endoftext|>"
UNK_TOKEN = "<unk>"


# `tiny-50k`: the tiny words plus filler tokens up to MPT-1B's 50,277 base tokens (50,280 with the Flamingo tokens),
# so embedding, head and loss have the released 3B model's vocabulary width while the data stays the tiny words.
MPT_1B_BASE_VOCAB = 50_277


def build_tiny_tokenizer():
    """A deterministic word-level tokenizer built offline from `WORDS` (no hub, no files).

    Like a hub tokenizer it has an eos (= bos) token and no pad, `<image>` or `<|endofchunk|>` token: the model
    factory adds those exactly as it does for a real LM's tokenizer.
    """
    return build_word_level_tokenizer(WORDS)


def build_tiny_50k_tokenizer():
    """`WORDS` padded with never-used filler tokens (`<filler123>`) to MPT-1B's vocabulary size."""
    return build_word_level_tokenizer(WORDS, vocab_size=MPT_1B_BASE_VOCAB)


def build_easy_vqa_tokenizer():
    """`WORDS` + `EASY_VQA_WORDS` (new words appended, so the tiny ids stay): easy-vqa in the VQA prompt format."""
    return build_word_level_tokenizer(WORDS + EASY_VQA_WORDS)


BUILTIN_TOKENIZERS = {
    "tiny": build_tiny_tokenizer, "tiny-50k": build_tiny_50k_tokenizer, "easy_vqa": build_easy_vqa_tokenizer,
}


def build_word_level_tokenizer(words: list[str], vocab_size: int | None = None):
    """Offline word-level tokenizer over `words` (duplicates keep their first id): lower-cased, split on
    whitespace and punctuation; eos = bos = `<|endoftext|>` (id 0), `<unk>` (id 1); padded with filler tokens to
    `vocab_size` tokens if given."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {EOS_TOKEN: 0, UNK_TOKEN: 1}
    for word in words:
        vocab.setdefault(word, len(vocab))
    while vocab_size is not None and len(vocab) < vocab_size:
        vocab[f"<filler{len(vocab)}>"] = len(vocab)
    backend = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=UNK_TOKEN,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
