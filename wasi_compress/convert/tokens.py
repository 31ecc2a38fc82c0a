"""Calibration token ids for `convert --objective data` on a text model: ``--calib random`` (uniform
random ids) or a UTF-8 text file, one sentence a line, tokenized with the tokenizer saved beside the
model (``tokenizer.json`` in its hf: folder; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wasi_compress.errors import UserError


TEXT_CALIB_LINES = 4096  # a text file's lines read without --calib-batches, at most


def calibration_token_batches(config, model: nn.Module, notes: list[str]) -> list[torch.Tensor]:
    """Without ``calib_batches``, a text file calibrates on every line (up to TEXT_CALIB_LINES): a
    sentence costs one short forward pass, and the embedding's token counts need many (unseen tokens
    are what limits a factored table, see transforms/_lowrank_embeddings.py)."""
    from wasi_compress.convert.config import IMAGE_CALIB_BATCHES
    from wasi_compress.inputs import token_ids

    tokens, bs = model.token_input, config.calib_batch_size
    if config.calib_batches is not None:
        n = config.calib_batches * bs
    else:
        n = IMAGE_CALIB_BATCHES * bs if config.calib == "random" else TEXT_CALIB_LINES
    if config.calib == "random":
        ids = token_ids(tokens, n, seed=config.seed)
        notes.append(f"calibrated on {n} sequences of uniform random token ids (no text given)")
    else:
        path = Path(config.calib)
        if not path.is_file():
            raise UserError(f"--calib {config.calib}: a text model calibrates on a text file (one sentence a line) "
                            "or random")
        ids = tokenize_lines(model, read_lines(path), tokens.seq_len)
        if config.calib_batches is not None and len(ids) < n:
            notes.append(f"calibration text {path.name} has {len(ids)} lines, fewer than {n} asked for")
        if len(ids) > n:
            notes.append(f"calibration text {path.name}: the first {n} of its {len(ids)} lines used")
        ids = ids[:n]
    return [ids[i:i + bs] for i in range(0, len(ids), bs)]


def read_lines(path: Path) -> list[str]:
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--calib {path}: not a readable UTF-8 text file ({type(exc).__name__})") from None
    lines = [line for line in lines if line]
    if not lines:
        raise UserError(f"--calib {path}: holds no text")
    return lines


_NO_TOKENIZER = "calibrating on text needs the model's tokenizer.json in its hf: folder; use --calib random"


def tokenize_lines(model: nn.Module, lines: list[str], seq_len: int, *, missing: str = _NO_TOKENIZER) -> torch.Tensor:
    """Token ids (len(lines) x seq_len), truncated and padded with the model's pad id. ``missing``: the
    error when the model's folder has no tokenizer.json."""
    folder = getattr(model, "hf_dir", None)
    if folder is None or not (Path(folder) / "tokenizer.json").is_file():
        raise UserError(missing)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(Path(folder) / "tokenizer.json"))
    pad = model.token_input.pad_token_id or 0
    tokenizer.enable_truncation(seq_len)
    tokenizer.enable_padding(length=seq_len, pad_id=pad)
    return torch.tensor([e.ids for e in tokenizer.encode_batch(lines)], dtype=torch.long)
