"""Writing training shards, apart from the training path: the converters from public layouts (webdataset,
img2dataset, raw MMC4) to MDS or webdataset (`convert`, with the CLI plumbing of tools/convert_*.py in `cli`), and
the built-in synthetic data set (`synthetic`). They write the layouts `flamingo_composer.data` reads (its `mds`
module defines the MDS columns); the training path never imports this package.
"""
