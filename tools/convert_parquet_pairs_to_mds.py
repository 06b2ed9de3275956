#!/usr/bin/env python
"""`flamingo-convert-parquet-pairs` under its old path."""

import sys

from flamingo_composer.cli.convert_parquet_pairs import main

sys.exit(main())
