"""The interleaved kind's processor, by layout: `matched` (MMC4: sentences + images + similarity matrix) or
`natural` (OBELICS, MINT-1T-HTML, OmniCorpus-CC: text and images in page order). The one place that picks it."""

from __future__ import annotations

from flamingo_composer.data.documents import DocumentProcessor
from flamingo_composer.data.mmc4 import MMC4PreprocessConfig, MMC4Processor


def interleaved_processor(
    tokenizer, split, preprocess: MMC4PreprocessConfig, seed: int
) -> MMC4Processor | DocumentProcessor:
    """The processor for `preprocess.layout`, called `process(raw, *, epoch, key)` in the reader workers; `split`:
    the image transform (a `SplitImageTransform` or one it can split)."""
    if preprocess.layout == "natural":
        return DocumentProcessor(tokenizer, split, preprocess, seed)
    return MMC4Processor(tokenizer, split, preprocess, seed)
