"""The Flamingo special tokens: their strings and the ids a tokenizer gives them (one definition for the model,
the data pipeline and the tools; a leaf: imports nothing of the package).

`<image>` marks where an image goes, `<|endofchunk|>` ends the text that belongs to it, and `<PAD>` is added as
the pad token when a tokenizer has none (as the reference does). Ids are looked up from the tokenizer after
`models.embeddings.add_flamingo_tokens` added the strings, never hard-coded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

MEDIA_TOKEN = "<image>"
ENDOFCHUNK_TOKEN = "<|endofchunk|>"
PAD_TOKEN = "<PAD>"


@dataclass(frozen=True)
class SpecialTokens:
    """Token ids of the special tokens that drive masking, the media mask and generation."""

    media: int
    endofchunk: int
    pad: int
    eos: int

    @classmethod
    def from_tokenizer(cls, tokenizer) -> SpecialTokens:
        """Look the ids up in the tokenizer (after the Flamingo tokens were added); ValueError naming what lacks."""
        vocab = tokenizer.get_vocab()
        missing = [tok for tok in (MEDIA_TOKEN, ENDOFCHUNK_TOKEN) if tok not in vocab]
        if missing:
            raise ValueError(
                f"tokenizer {type(tokenizer).__name__} has no {', '.join(missing)} token: "
                "add the Flamingo special tokens (as the model factory does) before building the data pipeline"
            )
        if tokenizer.pad_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token (expected e.g. '{PAD_TOKEN}')")
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no eos token")
        return cls(
            media=int(vocab[MEDIA_TOKEN]),
            endofchunk=int(vocab[ENDOFCHUNK_TOKEN]),
            pad=int(tokenizer.pad_token_id),
            eos=int(tokenizer.eos_token_id),
        )

    def as_dict(self) -> dict[str, int]:
        """{'media', 'endofchunk', 'pad', 'eos'} -> id (the model's `special_token_ids`)."""
        return asdict(self)


SPECIAL_TOKEN_KEYS = tuple(f.name for f in fields(SpecialTokens))  # ('media', 'endofchunk', 'pad', 'eos')
