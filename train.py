"""Train a Flamingo model: `composer train.py yamls/run.yaml [dotted.key=value ...]` (or plain `python train.py`)."""

import sys

from flamingo_composer.training.run import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
