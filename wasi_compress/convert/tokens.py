"""Calibration token ids for `convert --objective data` on a text model: ``--calib random`` (uniform
random ids) or a UTF-8 text file, one sentence a line, tokenized with the tokenizer saved beside the
model (``tokenizer.json`` in its hf: folder; nothing is downloaded)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from wasi_compress.errors import UserError


def calibration_token_batches(config, model: nn.Module, notes: list[str]) -> list[torch.Tensor]:
    from wasi_compress.inputs import token_ids

    tokens = model.token_input
    n, bs = config.calib_batches * config.calib_batch_size, config.calib_batch_size
    if config.calib == "random":
        ids = token_ids(tokens, n, seed=config.seed)
        notes.append(f"calibrated on {n} sequences of uniform random token ids (no text given)")
    else:
        path = Path(config.calib)
        if not path.is_file():
            raise UserError(f"--calib {config.calib}: a text model calibrates on a text file (one sentence a line) "
                            "or random")
        ids = tokenize_lines(model, read_lines(path), tokens.seq_len)
        if len(ids) < n:
            notes.append(f"calibration text {path.name} has {len(ids)} lines, fewer than {n} asked for")
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
