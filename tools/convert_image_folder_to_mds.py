#!/usr/bin/env python
"""`flamingo-convert-image-folder` under its old path."""

import sys

from flamingo_composer.cli.convert_image_folder import main

sys.exit(main())
