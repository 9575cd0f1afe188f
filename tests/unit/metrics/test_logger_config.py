"""The logger group: one switch per tracker, so Hydra's list of options turns on several."""

from __future__ import annotations

import pytest

from finetune.config.compose import compose_run_config
from finetune.config.schema import DisplayMode, LoggerName
from finetune.errors import ConfigError


@pytest.mark.parametrize(("overrides", "trackers"), [
    ([], []),
    (["logger=console"], []),
    (["logger=wandb"], ["wandb"]),
    (["logger=tensorboard"], ["tensorboard"]),
    (["logger=mlflow"], ["mlflow"]),
    (["logger=[wandb,tensorboard]"], ["wandb", "tensorboard"]),
    (["logger=[console,mlflow]", "logger.project=exp"], ["mlflow"]),
    (["logger.tensorboard=true", "logger.wandb=true"], ["wandb", "tensorboard"]),
])
def test_logger_options_compose(overrides: list[str], trackers: list[str]) -> None:
    logger = compose_run_config("lora_sft", overrides).logger
    assert logger.trackers() == [LoggerName(name) for name in trackers]
    assert logger.display == DisplayMode.auto


def test_display_and_wandb_settings_are_typed() -> None:
    logger = compose_run_config("lora_sft", ["logger=wandb", "logger.display=plain",
                                             "logger.mode=offline"]).logger
    assert logger.display == "plain" and logger.mode == "offline"
    with pytest.raises(ConfigError, match="logger.display=fancy is not valid"):
        compose_run_config("lora_sft", ["logger.display=fancy"])


def test_an_unknown_logger_option_is_refused() -> None:
    with pytest.raises(ConfigError):
        compose_run_config("lora_sft", ["logger=neptune"])
