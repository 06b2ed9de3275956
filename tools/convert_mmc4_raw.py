#!/usr/bin/env python
"""`flamingo-convert-mmc4` under its old path."""

import sys

from flamingo_composer.cli.convert_mmc4 import main

sys.exit(main())
