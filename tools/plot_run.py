#!/usr/bin/env python
"""`flamingo-plot` under its old path (`composer -n N tools/plot_run.py` works)."""

import sys

from flamingo_composer.cli.plot import main

sys.exit(main())
