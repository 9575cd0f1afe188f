"""Prove the kernel plan on a real GPU and measure what a training step costs; the check lives
in the scripts/gpu_check/ package (its __init__ lists the sections). This file runs it:

    python scripts/gpu_check.py [--out report.json] [--skip-lora] [--no-doc] [--only SECTIONS]
    python scripts/gpu_check.py --dry-run       # CPU: every section on tiny shapes
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's root

from scripts.gpu_check.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
