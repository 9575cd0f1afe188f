"""`python -m scripts.gpu_check` (from the checkout's root); `python scripts/gpu_check.py` is the
same."""

import sys

from scripts.gpu_check.main import main

sys.exit(main())
