#!/usr/bin/env python
"""Convert image-caption parquet (Hugging Face caption sets) to LAION MDS shards; see --help."""

from __future__ import annotations

import sys

from flamingo_composer.shards.pair_commands import parquet_pairs_main as main

if __name__ == "__main__":
    sys.exit(main())
