#!/usr/bin/env python
"""`flamingo-convert-img2dataset` under its old path."""

import sys

from flamingo_composer.cli.convert_img2dataset import main

sys.exit(main())
