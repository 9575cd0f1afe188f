"""`finetune.cli.main` run in this process (the unit layer's fixtures)."""

from tests.unit.cli.conftest import _keep_logging, cli  # noqa: F401 (fixtures; one autouse)
