"""What a run trains on: the `TrainData` contract that build_data returns, and its statistics.

Two classes meet it: `InMemoryData` (every source tokenized up front or read from the cache;
finetune.data.in_memory) and `StreamingData` (read, tokenized and packed on the fly;
finetune.data.streaming). The trainer, `finetune data inspect` and the benchmarks see only this.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

from finetune.data.collate import Document


@dataclass
class DataStats:
    """What the data pipeline produced; `to_dict()` goes into summary.json."""

    format: str
    rows: int | None  # training examples per epoch (None: streaming, not known up front)
    val_rows: int | None
    tokens: int | None  # tokens in one epoch of training examples
    trained_tokens: int | None  # tokens with a label (targets), same epoch
    skipped_rows: int
    truncated_rows: int
    dropped_rows: int
    packed_sequences: int | None
    packing_efficiency: float | None
    max_seq_len: int
    max_seq_len_from: str = "data.max_seq_len"  # or how data.max_seq_len=auto chose it
    streaming: bool = False
    isolation: str | None = None
    padding_free: bool = False  # unpacked micro-batches collated as one row without padding
    template: str = "tokenizer"
    rows_read: int = 0
    skip_reasons: dict[str, int] = field(default_factory=dict)
    sources: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@runtime_checkable
class ResumableBatches(Protocol):
    """Collated micro-batches for one rank, epoch after epoch, without end.

    `state_dict()` after k batches says where the next one starts (JSON-serialisable);
    `load_state_dict` continues from there without replaying. `epoch` is the epoch of the next
    unit; `samples_per_epoch` is the number of units (examples, or packed rows) in an epoch,
    None when streaming (not known up front).
    """

    @property
    def samples_per_epoch(self) -> int | None: ...

    @property
    def epoch(self) -> int: ...

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@runtime_checkable
class TrainData(Protocol):
    """The data of one rank: training batches, held-out batches, a preview and statistics.

    `chat_template` is the Jinja template the examples were rendered with (the tokenizer's own,
    the built-in one, or data.chat_template); a run saves it beside its result.
    """

    chat_template: str

    @property
    def train(self) -> ResumableBatches:
        """The training micro-batches of this rank (resumable)."""
        ...

    @property
    def stats(self) -> DataStats:
        """Statistics; when streaming, the row counts so far (rows and tokens are None)."""
        ...

    def val_batches(self, max_batches: int | None = None) -> list[dict[str, Any]]:
        """The held-out split for this rank, collated, in a fixed order: at most `max_batches`
        (None: all); every rank gets the same number. [] when nothing is held out."""
        ...

    def preview(self, n: int = 1) -> list[Document]:
        """The first n training examples (file order) as (token ids, trained flags)."""
        ...
