"""Where the `finetune` loggers write: one stderr handler, set up once per process.

Rank 0 (or a single process) shows INFO and up on the console; other ranks show warnings and
errors only, while their logs/rank_K.log file (finetune.train.rank_log) keeps every record.
`FINETUNE_LOG_LEVEL` sets the level (default INFO).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings


def setup_logging() -> None:
    """Route the `finetune` loggers to stderr; call again once a process knows its rank (an
    srun task or a submitit job learns it after start)."""
    level = os.environ.get("FINETUNE_LOG_LEVEL", "INFO").upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    if os.environ.get("RANK", "0") != "0":  # the console; logs/rank_K.log keeps every record
        handler.setLevel(logging.WARNING)
    root = logging.getLogger("finetune")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # bitsandbytes warns at import about an optional package of its own; not the user's concern.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # peft calls a transformers method that transformers 5 renamed; the warning is not the user's.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)
