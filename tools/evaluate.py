#!/usr/bin/env python
"""`flamingo-evaluate` under its old path (`composer -n N tools/evaluate.py` works)."""

import sys

from flamingo_composer.cli.evaluate import main

sys.exit(main())
