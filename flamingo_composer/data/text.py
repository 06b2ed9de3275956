"""Text cleaning and the special-token ids the data pipeline places.

Only the pipeline may place `<image>` and `<|endofchunk|>`: a caption that literally contains "<image>" would
otherwise add an image token with no image behind it, and shift every later image to the wrong text.
"""

from __future__ import annotations

from dataclasses import dataclass

from flamingo_composer.data.skips import SkipSample

MEDIA_TOKEN = "<image>"
ENDOFCHUNK_TOKEN = "<|endofchunk|>"


def _pad_token_string(tokenizer) -> str | None:
    return getattr(tokenizer, "pad_token", None)


def clean_text(text: str, tokenizer) -> str:
    """Remove literal `<image>`, `<|endofchunk|>` and pad-token strings from raw text."""
    for literal in (MEDIA_TOKEN, ENDOFCHUNK_TOKEN, _pad_token_string(tokenizer)):
        if literal:
            text = text.replace(literal, "")
    return text


def require_utf8(text: str, *, where: str) -> str:
    """Reject strings that cannot be encoded as UTF-8 (lone surrogates from broken JSON escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise SkipSample("bad_utf8", f"{where}: {err}") from None
    return text


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of the special tokens that drive masking and the media mask."""

    media: int
    endofchunk: int
    pad: int
    eos: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        """Look the ids up in the tokenizer (after the model factory added the new tokens)."""
        vocab = tokenizer.get_vocab()
        missing = [tok for tok in (MEDIA_TOKEN, ENDOFCHUNK_TOKEN) if tok not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no {', '.join(missing)} token: "
                "add the Flamingo special tokens (as the model factory does) before building the data pipeline"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token (expected e.g. '<PAD>')")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token")
        return cls(
            media=int(vocab[MEDIA_TOKEN]),
            endofchunk=int(vocab[ENDOFCHUNK_TOKEN]),
            pad=int(tokenizer.pad_token_id),
            eos=int(tokenizer.eos_token_id),
        )
