"""Data layer: read files and bundled datasets, validate formats, apply templates, tokenize and mask."""

from tuneforge.data.builtin import BUILTINS, load_builtin
from tuneforge.data.encode import (
    IGNORE_INDEX,
    collate,
    encode_causal,
    encode_classification,
    encode_dataset,
    encode_text_chunks,
    label_vocabulary,
    split_train_eval,
)
from tuneforge.data.formats import (
    FORMATS,
    Example,
    apply_template,
    detect_format,
    load_examples,
    load_records,
    to_example,
)
from tuneforge.data.readers import Record, read_records

__all__ = [
    "BUILTINS",
    "FORMATS",
    "IGNORE_INDEX",
    "Example",
    "Record",
    "apply_template",
    "collate",
    "detect_format",
    "encode_causal",
    "encode_classification",
    "encode_dataset",
    "encode_text_chunks",
    "label_vocabulary",
    "load_builtin",
    "load_examples",
    "load_records",
    "read_records",
    "split_train_eval",
    "to_example",
]
