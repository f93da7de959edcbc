"""The methods' tests use the runtime's end-to-end helpers (`tests/runtime/runtime_testlib.py`)."""

import os
import sys

_RUNTIME = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'runtime')
if _RUNTIME not in sys.path:
  sys.path.append(_RUNTIME)
