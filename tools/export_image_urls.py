#!/usr/bin/env python
"""`flamingo-export-image-urls` under its tools/ path."""

import sys

from flamingo_composer.cli.export_image_urls import main

sys.exit(main())
