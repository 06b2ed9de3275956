#!/usr/bin/env python
"""`flamingo-sweep` under its old path (`composer -n N tools/sweep.py` works)."""

import sys

from flamingo_composer.cli.sweep import main

sys.exit(main())
