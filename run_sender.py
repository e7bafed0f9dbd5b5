"""Capture, run the pipeline and stream one view per viewer: python run_sender.py [--source sample] [--room NAME]"""

import sys

from models.avatar.compiling import leave
from telepresence.cli.send import main

if __name__ == "__main__":
    sys.exit(leave(main()))
