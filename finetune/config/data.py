"""Schema of the `data` config group: sources, format, templating, masking and packing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from finetune.config.choice import Choice


class TextUnit(Choice):
    """What one document is in a .txt file."""

    line = "line"
    paragraph = "paragraph"
    file = "file"


class Truncation(Choice):
    """What happens to a row longer than data.max_seq_len: cut, skip it, or stop with an error."""

    truncate = "truncate"
    drop = "drop"
    error = "error"


class TrainOn(Choice):
    """Which tokens the loss is computed on."""

    assistant = "assistant"
    all = "all"
    last_turn = "last_turn"


class OnBadRow(Choice):
    """What a malformed row does: stop the run with its location, or count it and skip it."""

    error = "error"
    skip = "skip"


class PaddingFree(Choice):
    """Unpacked micro-batches as one row of their examples, without padding: auto does it when
    the attention isolates documents in such rows (sdpa_varlen, varlen_attn,
    flash_attention_2/3/4); the examples, their order and the loss are those of padded rows."""

    auto = "auto"
    on = "on"
    off = "off"


@dataclass
class DataConfig:
    """Where the training text comes from and how it becomes token ids and labels.

    `path` is a file, a glob, a directory, `hf:org/name` for a hub dataset (or `hf:/local/dir`
    for a folder written by `save_to_disk` or a folder of data files), `builtin:NAME` for a
    dataset shipped with finetune, or a list of any of these. docs/data.md describes each key.
    """

    path: Any = "???"
    format: str = "auto"  # a format of finetune.data (e.g. alpaca, chat); auto: detected
    split: str = "train"  # split of an hf: dataset
    weights: Any = None  # one weight per path when `path` is a list (a mixture)
    columns: dict[str, str] = field(default_factory=dict)  # format field -> column in the data
    json_key: Any = None  # key that holds the records in a .json object; None: found by shape
    text_unit: TextUnit = TextUnit.line  # .txt files: one document per line, paragraph or file
    val_path: Any = None  # held-out data; None: hold out `val_split` of `path`
    val_split: float = 0.05
    max_seq_len: Any = "auto"  # tokens a row; auto: 99% of rows fit, within the model's context
    truncation: Truncation = Truncation.truncate
    train_on: TrainOn = TrainOn.assistant
    packing: bool = False
    padding_free: PaddingFree = PaddingFree.auto  # unpacked batches without padding (see above)
    streaming: bool = False
    stream_buffer: int = 2048  # streaming: rows shuffled and packed together
    shuffle: bool = True
    on_bad_row: OnBadRow = OnBadRow.error
    chat_template: Any = None  # None: the tokenizer's own (built-in if none) | builtin | Jinja text
    num_proc: int = 0  # processes that tokenize a large local .jsonl/.txt source; 0: one per CPU
    cache_dir: Any = None  # tokenized-data cache; None: $FINETUNE_CACHE/data or ~/.cache/finetune/data
