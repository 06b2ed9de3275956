#!/usr/bin/env python
"""`flamingo-convert-wds` under its old path."""

import sys

from flamingo_composer.cli.convert_wds import main

sys.exit(main())
