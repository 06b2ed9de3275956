#!/usr/bin/env python
"""Convert img2dataset output (webdataset, files or parquet form) to LAION MDS shards; see --help."""

from __future__ import annotations

import sys

from flamingo_composer.shards.pair_commands import img2dataset_main as main

if __name__ == "__main__":
    sys.exit(main())
