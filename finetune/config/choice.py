"""`Choice`: the base of every config field that takes one of a fixed set of values.

OmegaConf checks an Enum-typed field against its members, so a typo fails when the config is
composed and the error lists the allowed values. The `str` mixin keeps the members usable as the
plain strings they stand for: `PeftMethod.lora == "lora"`, dict keys, JSON, f-strings.
"""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A config value from a closed set. Member names equal their (lowercase) values.

    OmegaConf converts a YAML or command-line string to a member by *name*, hence names equal
    values; since an Enum member hashes its name, a member also works as a key where its value
    does (`{"lora": ...}[PeftMethod.lora]`). `str()` and `format()` give the value on every
    Python version (how str-mixin Enums format changed between 3.10 and 3.12).
    """

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)
