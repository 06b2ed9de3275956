#!/usr/bin/env python
"""Export the image URLs of natural-order interleaved parquet for img2dataset; see --help."""

from __future__ import annotations

import sys

from flamingo_composer.shards.document_commands import export_urls_main as main

if __name__ == "__main__":
    sys.exit(main())
