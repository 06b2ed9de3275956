#!/usr/bin/env python
"""`flamingo-export` under its old path (`composer -n N tools/export_openflamingo.py` works)."""

import sys

from flamingo_composer.cli.export import main

sys.exit(main())
