#!/usr/bin/env python
"""`flamingo-make-synthetic-data` under its old path (`composer -n N tools/make_synthetic_data.py` works)."""

import sys

from flamingo_composer.cli.make_synthetic_data import main

sys.exit(main())
