#!/usr/bin/env python
"""Convert a folder of images with a captions CSV / JSONL to LAION MDS shards; see --help."""

from __future__ import annotations

import sys

from flamingo_composer.shards.pair_commands import image_folder_main as main

if __name__ == "__main__":
    sys.exit(main())
