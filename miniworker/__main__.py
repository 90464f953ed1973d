from __future__ import annotations

import sys

from miniworker.worker import main

if __name__ == "__main__":
    sys.exit(main())
