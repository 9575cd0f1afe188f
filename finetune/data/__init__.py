"""The dataset pipeline: sources -> formats -> template + mask -> pack -> collate.

The trainer's entry point is `build_data`, which returns a `TrainData` (`InMemoryData`, or
`StreamingData` with data.streaming); docs/data.md describes every setting.
"""

from finetune.data.collate import IGNORE_INDEX, Collator
from finetune.data.errors import DataError
from finetune.data.formats import FORMATS, Example
from finetune.data.in_memory import InMemoryData
from finetune.data.packing import pack_documents, packing_isolation
from finetune.data.pipeline import build_data
from finetune.data.sampler import TrainBatches
from finetune.data.stream_batches import StreamingTrainBatches
from finetune.data.streaming import StreamingData
from finetune.data.template import BUILTIN_CHAT_TEMPLATE
from finetune.data.train_data import DataStats, ResumableBatches, TrainData

__all__ = [
    "BUILTIN_CHAT_TEMPLATE", "FORMATS", "IGNORE_INDEX", "Collator", "DataError", "DataStats",
    "Example", "InMemoryData", "ResumableBatches", "StreamingData", "StreamingTrainBatches",
    "TrainBatches", "TrainData", "build_data", "pack_documents", "packing_isolation",
]
