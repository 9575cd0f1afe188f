"""The pieces every op family shares: candidates, registries, model facts, decisions, errors.

A family (attention, optimizer, ...) is a `Registry` of `Candidate`s. Each candidate says
whether it can run on a profile (`supports`), with a reason a user can act on, and how it ranks
on each architecture family. The planner walks the ranked list and keeps the first candidate
that is supported and passes its self-check.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from packaging.version import InvalidVersion, Version

from finetune.errors import ConfigError
from finetune.hardware.arch import rank_family
from finetune.hardware.profile import HardwareProfile

Support = tuple[bool, str]


@dataclass(frozen=True)
class ModelFacts:
    """What the planner needs to know about the model and the batches it is trained on.

    Head fields may be None when the model is not known yet; shape checks are then skipped.
    `dtype` (bf16 | fp16 | fp32) is filled in by the planner from the precision family, and
    `packing` (documents packed into rows, `data.packing`) from `plan(..., packing=)`.
    """

    num_heads: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    dtype: str | None = None
    packing: bool = False

    def __post_init__(self) -> None:
        if self.num_heads and self.num_kv_heads and self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )


SupportsFn = Callable[[HardwareProfile, ModelFacts], Support]


@dataclass(frozen=True)
class Candidate:
    """One implementation of an op family.

    Attributes:
        name: the value users write (`kernels.attention=sdpa`).
        supports: `(profile, facts) -> (ok, reason)`; a negative reason starts with what the
            candidate needs ("needs the flash_attn package ..."), a positive one says why it
            fits.
        ranks: rank per architecture family (see finetune.hardware.arch.RANK_FAMILIES);
            lower is preferred; families not listed get `default_rank`.
        packed_ranks: ranks that replace `ranks` when the batches are packed (an attention
            path that is fast on whole rows can be the wrong one for packed documents).
        packed_rank: the rank for packed batches on families not in `packed_ranks`; None
            keeps the whole-row rank.
        auto: False for candidates only used when asked for by name (e.g. 8-bit optimizers).
        not_auto_reason: why such a candidate is never picked automatically.
    """

    name: str
    supports: SupportsFn
    ranks: Mapping[str, int] = field(default_factory=dict)
    default_rank: int = 100
    auto: bool = True
    not_auto_reason: str = ""
    packed_ranks: Mapping[str, int] = field(default_factory=dict)
    packed_rank: int | None = None

    def rank(self, profile: HardwareProfile, packing: bool = False) -> int:
        """This candidate's rank on the profile's architecture family (packed or not)."""
        family = rank_family(profile)
        if packing and family in self.packed_ranks:
            return self.packed_ranks[family]
        if packing and self.packed_rank is not None:
            return self.packed_rank
        return self.ranks.get(family, self.default_rank)


C = TypeVar("C", bound=Candidate)


class Registry(Generic[C]):
    """An ordered, name-keyed set of candidates of one family. Copy it to customise."""

    def __init__(self, family: str, candidates: Iterable[C] = ()) -> None:
        self.family = family
        self._candidates: dict[str, C] = {}
        for candidate in candidates:
            self.register(candidate)

    def register(self, candidate: C, *, replace: bool = False) -> None:
        """Add a candidate; replacing an existing name needs `replace=True`."""
        if candidate.name in self._candidates and not replace:
            raise ValueError(f"{self.family} candidate {candidate.name!r} is already registered")
        self._candidates[candidate.name] = candidate

    def get(self, name: str) -> C:
        """The candidate called `name`; KeyError listing the known names otherwise."""
        try:
            return self._candidates[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.family} candidate {name!r}; known: {', '.join(self.names())}"
            ) from None

    def names(self) -> tuple[str, ...]:
        """Candidate names in registration order."""
        return tuple(self._candidates)

    def ranked(self, profile: HardwareProfile, packing: bool = False) -> list[C]:
        """Candidates by rank on `profile`, for packed batches or not (registration order breaks
        ties)."""
        order = {name: i for i, name in enumerate(self._candidates)}
        return sorted(self._candidates.values(),
                      key=lambda c: (c.rank(profile, packing), order[c.name]))

    def copy(self) -> Registry[C]:
        """An independent registry with the same candidates."""
        return Registry(self.family, self._candidates.values())

    def __contains__(self, name: object) -> bool:
        return name in self._candidates

    def __iter__(self) -> Iterator[C]:
        return iter(self._candidates.values())


@dataclass(frozen=True)
class Rejection:
    """A candidate that was not chosen, and why."""

    name: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "reason": self.reason}


@dataclass(frozen=True)
class FamilyDecision:
    """The planner's choice for one op family.

    `details` holds family-specific fields written next to choice/reason in kernel_plan.json
    (attention: selfcheck, attn_implementation, sdpa_backend, packing_isolation; precision:
    base_dtype, autocast...).
    """

    family: str
    choice: str
    reason: str
    rejected: tuple[Rejection, ...] = ()
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "choice": self.choice,
            "reason": self.reason,
            **dict(self.details),
            "rejected": [r.to_dict() for r in self.rejected],
        }


class KernelOverrideError(ConfigError):
    """An explicit `kernels.<family>=<choice>` that this machine cannot honour (exit code 2).

    Never silently replaced: the run stops and the message names the alternatives.
    """

    def __init__(
        self,
        family: str,
        choice: str,
        reason: str,
        *,
        machine: str | None = None,
        alternatives: Iterable[str] = (),
    ) -> None:
        self.family = family
        self.choice = choice
        self.reason = reason
        self.alternatives = tuple(alternatives)
        message = f"kernels.{family}={choice} is not possible here: {reason}"
        if machine:
            message += f"; this machine is {machine}"
        message += f". Use kernels.{family}=auto"
        if self.alternatives:
            message += f" or one of: {', '.join(self.alternatives)}"
        super().__init__(message)


def version_at_least(version: str | None, minimum: str) -> bool:
    """True when `version` is `minimum` or newer (dev and rc builds count); False when unknown."""
    if version is None:
        return False
    try:
        have = Version(version).release
    except InvalidVersion:
        return False
    return have >= Version(minimum).release


def torch_at_least(profile: HardwareProfile, minimum: str) -> bool:
    """True when the profile's torch version is `minimum` or newer (dev builds count)."""
    return version_at_least(profile.torch, minimum)


def runtime_at_least(profile: HardwareProfile, runtime: str, minimum: str) -> bool:
    """True when the profile runs `runtime` (cuda | rocm) at version `minimum` or newer."""
    kind, _, version = profile.runtime.partition(" ")
    if kind != runtime:
        return False
    try:
        return Version(version).release >= Version(minimum).release
    except InvalidVersion:
        return False
