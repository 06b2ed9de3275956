"""flamingo_composer: train OpenFlamingo-style vision-language models with MosaicML Composer."""

__version__ = "0.1.0"
