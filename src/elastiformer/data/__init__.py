"""Data in, batches out: `text` (the bundled Gutenberg books, user text / JSONL / datasets folders, packing into
sequences, sentences for encoders), `images` (Fashion-MNIST from its Debian package, pixel values for a given ViT)
and `batches` (whatever data a user passes, as model-input batches)."""

from .batches import as_batches
from .images import ImageFormat, load_fashion_mnist, pixel_values_for
from .text import load_dataset_for, load_sentences, load_texts, pack_sequences, sentence_batches

__all__ = ["ImageFormat", "as_batches", "load_dataset_for", "load_fashion_mnist", "load_sentences", "load_texts",
           "pack_sequences", "pixel_values_for", "sentence_batches"]
