#!/usr/bin/env python
"""`flamingo-import` under its old path (`composer -n N tools/import_checkpoint.py` works)."""

import sys

from flamingo_composer.cli.import_checkpoint import main

sys.exit(main())
