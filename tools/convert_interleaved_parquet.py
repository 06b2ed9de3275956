#!/usr/bin/env python
"""Convert natural-order interleaved parquet (OBELICS, MINT-1T-HTML, OmniCorpus-CC) to document shards; see --help."""

from __future__ import annotations

import sys

from flamingo_composer.shards.document_commands import convert_main as main

if __name__ == "__main__":
    sys.exit(main())
