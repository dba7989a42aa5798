"""Data: corpora (embedded Shakespeare, local files, hub datasets), byte-level BPE, packed
sequences, and the `TextDataModule` that ties them together for Lightning; synthetic
multi-query associative recall with ground truth (`RecallDataModule`)."""

from sparse_viz.data.corpus import SHAKESPEARE_VAL_PLAYS, Corpus, Document, load_corpus, strip_play_markdown
from sparse_viz.data.datamodule import TextDataModule
from sparse_viz.data.recall_datamodule import RecallDataModule
from sparse_viz.data.tokenizer import END_OF_TEXT, MIN_VOCAB_SIZE, load_tokenizer, train_bpe

__all__ = [
    "END_OF_TEXT",
    "MIN_VOCAB_SIZE",
    "SHAKESPEARE_VAL_PLAYS",
    "Corpus",
    "Document",
    "RecallDataModule",
    "TextDataModule",
    "load_corpus",
    "load_tokenizer",
    "strip_play_markdown",
    "train_bpe",
]
