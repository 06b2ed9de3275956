"""Writing training shards, apart from the training path: the converters from public layouts to MDS or webdataset
(image-caption pairs from img2dataset output, caption parquet or an image folder, through `pairs`; webdataset and
raw MMC4 in `convert`; natural-order interleaved parquet), the argument plumbing of their commands (`cli`; the
commands themselves are flamingo_composer.cli's), and the built-in synthetic data (`synthetic`). They write the
layouts `flamingo_composer.data` reads (its `mds` module defines the MDS columns); the training path never imports
this package.
"""
