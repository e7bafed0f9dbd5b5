"""Serve the viewer page and the signaling endpoint: python run_receiver.py [--host H] [--port P] [--token T]"""

import sys

from telepresence.cli.receive import main

if __name__ == "__main__":
    sys.exit(main())
