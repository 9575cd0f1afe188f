"""Run `finetune` and kill -9 this process at a chosen checkpoint, for the resume tests.

FT_CRASH_AT_STEP=k and FT_CRASH_MODE=during|after: SIGKILL while the step-k checkpoint is being
written (files there, manifest not yet), or right after it is complete. Only rank 0 kills.
"""

import os
import signal
import sys

from finetune.checkpoint import store

CRASH_STEP = int(os.environ["FT_CRASH_AT_STEP"])
MODE = os.environ.get("FT_CRASH_MODE", "after")
_finish = store.finish_checkpoint


def _finish_then_maybe_die(output_dir, step):
    if step == CRASH_STEP and MODE == "during":
        os.kill(os.getpid(), signal.SIGKILL)
    path = _finish(output_dir, step)
    if step == CRASH_STEP and MODE == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return path


store.finish_checkpoint = _finish_then_maybe_die

from finetune.cli import main  # noqa: E402  (after the patch, as the trainer sees it)

sys.exit(main(sys.argv[1:]))
