#!/usr/bin/env python
"""`flamingo-convert-interleaved` under its tools/ path."""

import sys

from flamingo_composer.cli.convert_interleaved import main

sys.exit(main())
