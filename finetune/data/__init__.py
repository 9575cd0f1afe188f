"""The dataset pipeline: sources -> formats -> template + mask -> pack -> collate.

The trainer's entry point is `build_data`; docs/data.md describes every setting.
"""

from finetune.data.collate import IGNORE_INDEX, Collator
from finetune.data.errors import DataError
from finetune.data.formats import FORMATS, Example
from finetune.data.packing import pack_documents, packing_isolation
from finetune.data.pipeline import DataBundle, DataStats, build_data
from finetune.data.sampler import TrainBatches
from finetune.data.streaming import StreamingTrainBatches
from finetune.data.template import BUILTIN_CHAT_TEMPLATE

__all__ = [
    "BUILTIN_CHAT_TEMPLATE", "FORMATS", "IGNORE_INDEX", "Collator", "DataBundle",
    "DataError", "DataStats", "Example", "StreamingTrainBatches", "TrainBatches", "build_data",
    "pack_documents", "packing_isolation",
]
