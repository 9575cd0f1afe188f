"""User-facing errors. Each carries the exit code the command line returns for it."""

from __future__ import annotations


class FinetuneError(Exception):
    """An error whose message is written for the user: what, where, and how to fix it."""

    exit_code = 1


class ConfigError(FinetuneError, ValueError):
    """A bad config value, key, recipe name or command-line argument (exit code 2)."""

    exit_code = 2


class OutputDirError(FinetuneError):
    """The output directory cannot be used as asked (exit code 2)."""

    exit_code = 2


class CheckpointError(FinetuneError):
    """A checkpoint is missing, incomplete, corrupt or incompatible with the run (exit code 2)."""

    exit_code = 2


class RendezvousError(FinetuneError):
    """The nodes of a multi-node run did not meet within distributed.timeout_s (exit code 2:
    the command lines or the network need fixing, the run itself has not started)."""

    exit_code = 2


class TrainingError(FinetuneError):
    """Training cannot continue (e.g. a NaN loss with trainer.on_nan=stop)."""

    exit_code = 1


class DiskFullError(FinetuneError):
    """A write ran out of disk space; the message names the path, the bytes needed and free."""

    exit_code = 1
