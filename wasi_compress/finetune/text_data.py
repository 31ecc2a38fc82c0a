"""Text-classification data for fine-tuning a text model: ``--data text:FILE`` (one example a line,
``label<TAB>sentence``), ``text:TRAIN,TEST`` (a held-out file of the same form) or the built-in
``stdlib-docs`` task (stdlib_docs.py). Sentences are tokenized once with the model's own tokenizer
(``tokenizer.json`` in its hf: folder), padded with its pad id to ``--seq-len`` tokens: the model wrapper
builds the attention mask from that padding (hf.HFTextModel).

Without a held-out file, 20% of each class is held out, chosen by the same fixed seed as the image
datasets' split (wasi_compress.data.SPLIT_SEED): the held-out set does not move with --seed, so
accuracies are comparable across runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from wasi_compress.errors import UserError

PREFIX = "text:"
TEST_FRACTION = 0.2
EVAL_BATCH = 256  # as the image splits' (finetune/data.py, which imports this module)
FORMAT = "each line is label<TAB>sentence"


def is_text_data(name: str) -> bool:
    from wasi_compress.finetune.stdlib_docs import NAME

    return name.strip() == NAME or name.strip().startswith(PREFIX)


def data_files(name: str) -> list[str]:
    """The files a ``text:`` --data reads (inputs no output may overwrite)."""
    return list(_paths(name.strip())) if name.strip().startswith(PREFIX) else []


@dataclass
class TextDataset:
    name: str
    ids: Tensor         # (N, seq_len) int64 token ids, padded with the model's pad id
    labels: Tensor      # (N,) int64
    num_classes: int
    notes: list[str] = field(default_factory=list)

    @property
    def images(self) -> Tensor:
        """The split's model inputs, under the name the job reads for image splits too (ImageDataset)."""
        return self.ids

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class TextData:
    """The train and held-out splits of a text task, as token ids the model takes (TrainingData's interface)."""

    def __init__(self, name: str, model: nn.Module, device: str):
        train, test, classes, notes = read_task(name)
        seq_len = model.token_input.seq_len
        self.device, self.classes, self.num_classes = device, classes, len(classes)
        self.train = self._split(name, train, classes, model)
        self.test = self._split(name, test, classes, model)
        full = int(sum((split.ids[:, -1] != (model.token_input.pad_token_id or 0)).sum() for split in (self.train, self.test)))
        self.notes = notes + [f"{len(classes)} classes ({', '.join(classes)}): {len(self.train)} training and "
                              f"{len(self.test)} held-out sentences, tokenized to {seq_len} tokens"]
        if full:
            self.notes.append(f"{full} sentences fill all {seq_len} tokens (longer ones are cut): raise --seq-len to keep more")

    @staticmethod
    def _split(name: str, pairs: list[tuple[str, str]], classes: list[str], model: nn.Module) -> TextDataset:
        from wasi_compress.convert.tokens import tokenize_lines

        folder = getattr(model, "hf_dir", None)
        missing = (f"--data {name}: the model has no tokenizer.json beside its weights"
                   f"{f' in {folder}' if folder else ' (a checkpoint does not carry one)'}; fine-tuning on text "
                   "needs the model's tokenizer: save it into the hf: folder (tokenizer.save_pretrained)")
        ids = tokenize_lines(model, [s for _, s in pairs], model.token_input.seq_len, missing=missing)
        vocab = model.token_input.vocab_size
        if len(ids) and int(ids.max()) >= vocab:
            raise UserError(f"--data {name}: the tokenizer gives token id {int(ids.max())}, beyond the model's "
                            f"vocabulary of {vocab}; the folder's tokenizer.json is not this model's")
        index = {c: i for i, c in enumerate(classes)}
        labels = torch.tensor([index[label] for label, _ in pairs], dtype=torch.long)
        return TextDataset(name, ids, labels, len(classes))

    def batch(self, ids: Tensor) -> Tensor:
        return ids.to(self.device)

    def test_batches(self):
        from wasi_compress.evaluation import batched

        return batched(self.test.ids, self.test.labels, EVAL_BATCH, self.batch)


def read_task(name: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]], list[str], list[str]]:
    """(train pairs, held-out pairs, class names sorted, notes) of a text --data value."""
    from wasi_compress.finetune import stdlib_docs

    name = name.strip()
    if name == stdlib_docs.NAME:
        pairs, note = stdlib_docs.examples()
        train, test = _hold_out(pairs)
        return train, test, sorted({label for label, _ in pairs}), [note]
    train_path, test_path = _paths(name)
    train = read_examples(train_path)
    classes = sorted({label for label, _ in train})
    if len(classes) < 2:
        raise UserError(f"--data {name}: {train_path} has only one label ({classes[0]!r}); a classification task needs "
                        f"two or more ({FORMAT})")
    if test_path is None:
        train, test = _hold_out(train)
        if not test:
            raise UserError(f"--data {name}: {len(train)} examples are too few to hold any out (20% of each label); "
                            f"add examples or give a held-out file: text:TRAIN,TEST")
        return train, test, classes, [f"{train_path.name}: 20% of each label held out (fixed split seed)"]
    test = read_examples(test_path)
    unknown = sorted({label for label, _ in test} - set(classes))
    if unknown:
        raise UserError(f"--data {name}: {test_path} has the label {unknown[0]!r}, which {train_path} never uses")
    return train, test, classes, [f"trained on {train_path.name}, held out {test_path.name}"]


def _paths(name: str) -> tuple[Path, Path | None]:
    """TRAIN and TEST of ``text:TRAIN[,TEST]`` (a whole value naming a file is one file, commas and all)."""
    rest = name[len(PREFIX):].strip()
    if not rest:
        raise UserError(f"--data {name}: give a file, text:FILE ({FORMAT}), or text:TRAIN,TEST")
    if Path(rest).is_file() or "," not in rest:
        return Path(rest), None
    train, _, test = rest.rpartition(",")
    return Path(train), Path(test)


def read_examples(path: Path) -> list[tuple[str, str]]:
    """The (label, sentence) pairs of a text file; blank lines are skipped, anything else malformed is one line."""
    if not path.is_file():
        raise UserError(f"--data text:{path}: no such file ({FORMAT})")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"--data text:{path}: not a readable UTF-8 text file ({type(exc).__name__})") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise UserError(f"{path}:{number}: no tab between label and sentence ({FORMAT})")
        label, sentence = (part.strip() for part in line.split("\t", 1))
        if not label or not sentence:
            raise UserError(f"{path}:{number}: {'empty label' if not label else 'no sentence after the tab'} ({FORMAT})")
        pairs.append((label, sentence))
    if not pairs:
        raise UserError(f"--data text:{path}: the file holds no examples ({FORMAT})")
    return pairs


def _hold_out(pairs: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Stratified: TEST_FRACTION of each label held out, by the image datasets' fixed split seed."""
    from wasi_compress.data import _stratified_split

    names = sorted({label for label, _ in pairs})
    labels = np.array([names.index(label) for label, _ in pairs])
    train_idx, test_idx = _stratified_split(labels, TEST_FRACTION)
    return [pairs[i] for i in train_idx], [pairs[i] for i in test_idx]
