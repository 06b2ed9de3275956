#!/usr/bin/env python
"""`flamingo-prepare-easy-vqa` under its old path (`composer -n N tools/prepare_easy_vqa.py` works)."""

import sys

from flamingo_composer.cli.prepare_easy_vqa import main

sys.exit(main())
