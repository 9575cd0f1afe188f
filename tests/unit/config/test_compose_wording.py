"""The wording of config errors built from Hydra's messages."""

from __future__ import annotations

import pytest

from finetune.config.compose import compose_run_config
from finetune.errors import ConfigError


@pytest.mark.parametrize("override", ["logger=[console,foo]", "logger=[foo]", "trainer=nope"])
def test_a_missing_config_is_named_in_one_clean_sentence(override: str) -> None:
    with pytest.raises(ConfigError) as info:
        compose_run_config("lora_sft", [override])
    message = str(info.value)
    assert "foo" in message or "nope" in message
    assert ".." not in message and "finetune ls" in message
