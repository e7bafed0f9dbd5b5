"""MediaPipe's native (C++) log lines -- TFLite's "Created TensorFlow Lite XNNPACK delegate", absl's
`W0000 ...` lines -- are written straight to file descriptor 2, past Python's logging. While a graph is
made and first run, fd 2 is caught here: those known lines go to this module's DEBUG log (shown with
-v); anything else written to fd 2 meanwhile is passed on to the real stderr, so nothing is lost."""
from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
from typing import Iterator

logger = logging.getLogger(__name__)

NATIVE_NOISE = re.compile(
    r"^(?:[IWE]\d{4} [\d:.]+\s+\d+ \S+\.cc:\d+\]"  # absl/glog: W0000 00:00:1795... 8053 file.cc:114] ...
    r"|INFO: Created TensorFlow Lite .*delegate"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR)"
)
_lock = threading.Lock()


@contextlib.contextmanager
def native_logs_to_debug() -> Iterator[None]:
    """Catch fd 2 for the duration (see the module doc). With DEBUG logging on, does nothing."""
    if logger.isEnabledFor(logging.DEBUG):
        yield
        return
    with _lock:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as caught:
            os.dup2(caught.fileno(), 2)
            try:
                yield
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                caught.seek(0)
                text = caught.read().decode("utf-8", "replace")
        passed = []
        for line in text.splitlines():
            if NATIVE_NOISE.match(line):
                logger.debug("%s", line)
            else:
                passed.append(line)
        if passed:
            sys.stderr.write("\n".join(passed) + "\n")
            sys.stderr.flush()
