#!/usr/bin/env python
"""`flamingo-generate` under its old path (`composer -n N tools/generate.py` works)."""

import sys

from flamingo_composer.cli.generate import main

sys.exit(main())
