"""Checkpoints of converted (and fine-tuned) models: safetensors files that carry their own architecture.

A checkpoint is a plain safetensors file: tensors only, so loading one never runs code. Its metadata
holds one key, ``wasi_compress``, a JSON string (sorted keys, no timestamps, so the same model gives
the same bytes) with

- ``format``: ``"wasi-compress/checkpoint/1"`` (a reader refuses formats it does not know);
- ``toolkit_version``: the ``wasi_compress.__version__`` that wrote it;
- ``source``: how to build the original architecture without weights: ``{"arch": "timm:<name>" |
  "builtin:<name>" | "package.module:factory" | "hf:<ModelClass>", "num_classes": int | null, "img_size":
  int | null}``; an ``hf:`` source adds ``hf_config`` (the transformers config, JSON) and ``seq_len``, and ``head``
  (``"mean-pool"``, hf.HEADS) when finetune gave a base text encoder a classification head;
- ``structure``: one entry per replaced linear site, ``{"name", "kind": "module" | "functional",
  "module": "subspace" | "jactus", "rank", "bias", "in_features", "out_features"}``, and for ``jactus``
  (a JactusLinear: Q_L, C, Q_R) ``rank_in`` too: ``rank`` is k_L, ``rank_in`` k_R; ``name`` is the site's name in
  the source architecture (module qualname, or the weight's qualname for a functional linear); a token
  embedding factored as E ~ A B has ``"module": "embedding"``, ``in_features`` its vocabulary,
  ``out_features`` its width, and ``kept`` (its rows stored exactly) when it keeps any;
- ``explicit_attention``: whether ``nn.MultiheadAttention`` modules were rewritten with explicit
  projections (passes/attention.py) before the sites were replaced;
- ``aliases``: ``{dropped key: kept key}`` for state-dict entries that shared one tensor (stored once);
- ``dtype``: the dtype floating tensors are stored in;
- whatever the writer adds (``extra``): ``convert`` adds its ``plan``, ``seed`` and settings.

`restore` rebuilds the source architecture, rewrites attention if the file says so, puts empty
`SubspaceLinear` modules at the listed sites and loads the state dict strictly. It computes no SVD and
plans nothing: the file alone decides the structure.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn

from wasi_compress import _compat  # noqa: F401  (before timm)
from wasi_compress.architectures import build_architecture, builtin_architectures, runs_code
from wasi_compress.errors import UserError
from wasi_compress.fileio import atomic_path
from wasi_compress.inputs import data_config, model_example
from wasi_compress.modules.jactus import JactusLinear
from wasi_compress.modules.lowrank_conv import LowRankConv2d, factorable_conv
from wasi_compress.modules.lowrank_embedding import LowRankEmbedding
from wasi_compress.modules.subspace import SubspaceLinear
from wasi_compress.passes.capture import LinearSite
from wasi_compress.weights import METADATA_KEY, load_state_dict_strict, read_state_dict

FORMAT = "wasi-compress/checkpoint/1"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_RESERVED = ("format", "toolkit_version", "source", "structure", "dtype", "aliases", "explicit_attention")
_STRUCTURE_KEYS = ("name", "kind", "module", "rank", "bias", "in_features", "out_features")
_MODULE_KINDS = {"subspace": SubspaceLinear, "lowrank_conv": LowRankConv2d, "embedding": LowRankEmbedding,
                 "jactus": JactusLinear}
_FACTORED = (SubspaceLinear, JactusLinear)

# Attributes of the source model that describe its input; copied onto a GraphModule that replaces it.
_MODEL_ATTRS = ("pretrained_cfg", "default_cfg", "num_classes", "default_input_size", "token_input", "hf_source",
                "wasi_compress_source")  # the last: how wasi_compress.load built it (transforms/persist.py)


def structure_entry(site: LinearSite, module: nn.Module) -> dict[str, Any]:
    """The structure entry of a site replaced by a SubspaceLinear or a JactusLinear, of a convolution
    replaced by a LowRankConv2d (kind "module", in_features its unfolded patch I k k), or of an embedding
    replaced by a LowRankEmbedding (``in_features``: its vocabulary, ``out_features``: its width)."""
    if isinstance(module, LowRankConv2d):
        return {"name": site.name, "kind": "module", "module": "lowrank_conv", "rank": int(module.rank),
                "bias": module.second.bias is not None, "in_features": int(module.in_features),
                "out_features": int(module.out_features)}
    if isinstance(module, LowRankEmbedding):
        entry = {"name": site.name, "kind": "module", "module": "embedding", "rank": int(module.rank), "bias": False,
                 "in_features": module.num_embeddings, "out_features": module.embedding_dim}
        return entry | ({"kept": int(module.kept)} if module.kept else {})  # rows stored exactly (0: none)
    if not isinstance(module, _FACTORED):
        raise TypeError(f"{site.name}: only SubspaceLinear and JactusLinear modules are recorded, got {type(module).__name__}")
    entry = {"name": site.name, "kind": site.kind, "module": "subspace", "rank": int(module.rank),
             "bias": module.bias is not None, "in_features": int(module.in_features),
             "out_features": int(module.out_features)}
    if isinstance(module, JactusLinear):
        entry.update(module="jactus", rank_in=int(module.rank_in))
    return entry


def module_location(model: nn.Module, entry: dict[str, Any]) -> str:
    """Where the replacement module of a structure entry lives in a restored model (see passes/replace.py:
    a functional linear on a raw parameter ``a.w`` becomes the module ``a.w_linear``)."""
    if entry["kind"] == "module":
        return entry["name"]
    try:
        if isinstance(model.get_submodule(entry["name"]), _FACTORED):
            return entry["name"]
    except AttributeError:
        pass
    return entry["name"] + "_linear"


def stored_tensors(model: nn.Module, dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict as it will be stored: floating tensors cast to `dtype`, every tensor contiguous and
    owning its memory, and entries that share one tensor stored once (``aliases``: dropped -> kept)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        if not isinstance(value, torch.Tensor):
            raise UserError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor; cannot store it")
        value = value.detach()
        identity = (value.device, value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape),
                    tuple(value.stride()), value.dtype)
        if value.numel() and identity in seen:
            aliases[key] = seen[identity]
            continue
        seen[identity] = key
        target = dtype if value.is_floating_point() else value.dtype
        tensors[key] = value.to(device="cpu", dtype=target, copy=True).contiguous()
    return tensors, aliases


def stored_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the tensors a checkpoint of `model` holds in `dtype` (the safetensors header aside)."""
    total, seen = 0, set()
    for value in model.state_dict().values():
        key = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()))
        if value.numel() and key in seen:
            continue
        seen.add(key)
        size = torch.finfo(dtype).bits // 8 if value.is_floating_point() else value.element_size()
        total += value.numel() * size
    return total


def save_checkpoint(path: str | os.PathLike, model: nn.Module, *, source: dict[str, Any],
                    structure: list[dict[str, Any]], extra: dict[str, Any] | None = None,
                    dtype: str | torch.dtype = "float32", explicit_attention: bool | None = None) -> Path:
    """Write `model` as a checkpoint at `path` (atomically) and return the path.

    ``source`` names the architecture (see the module docstring); ``structure`` lists the replaced
    sites; ``extra`` adds JSON-serialisable keys to the metadata (e.g. the plan). Floating tensors are
    stored in ``dtype``. ``explicit_attention`` defaults to whether `model` has rewritten attention."""
    from safetensors.torch import save_file

    from wasi_compress import __version__

    dtype_name = _dtype_name(dtype)
    source = _check_source(source, where=str(path))
    structure = [_check_entry(e, where=str(path)) for e in structure]
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra metadata may not override {', '.join(clash)}")
    if explicit_attention is None:
        from wasi_compress.passes.attention import ExplicitMultiheadAttention

        explicit_attention = any(isinstance(m, ExplicitMultiheadAttention) for m in model.modules())
    tensors, aliases = stored_tensors(model, DTYPES[dtype_name])
    metadata = {
        "format": FORMAT, "toolkit_version": __version__, "source": source,
        "structure": sorted(structure, key=lambda e: (e["kind"], e["name"])),
        "dtype": dtype_name, "aliases": aliases, "explicit_attention": bool(explicit_attention), **extra,
    }
    text = json.dumps(metadata, sort_keys=True, separators=(",", ":"), allow_nan=False)
    if Path(path).suffix.lower() != ".safetensors":
        raise UserError(f"{path}: a checkpoint must have the .safetensors suffix (that is how loaders recognise it)")
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: text})
    return Path(path)


def restore(path: str | os.PathLike, metadata: dict[str, Any], trust_pickle: bool = False, *,
            trust_code: bool = False) -> nn.Module:
    """Rebuild the model a checkpoint describes and load its tensors (float32 for compute).

    No SVD, no planning, no pickle (``trust_pickle`` is accepted for the loader's signature and unused:
    checkpoints hold tensors only). A source naming a ``package.module:factory`` would import and call
    code the file chose: refused unless ``trust_code``."""
    from safetensors import safe_open

    where = str(path)
    fmt = metadata.get("format")
    if fmt != FORMAT:
        raise UserError(f"{where}: checkpoint format {fmt!r} is not one this version reads ({FORMAT}); "
                        "was it written by a newer wasi-compress?")
    source = _check_source(metadata.get("source"), where=where)
    raw_structure = metadata.get("structure", [])
    if not isinstance(raw_structure, list):
        raise UserError(f"{where}: its structure is not a list; the file is damaged")
    structure = [_check_entry(e, where=where) for e in raw_structure]
    aliases = metadata.get("aliases") or {}
    if not isinstance(aliases, dict):
        raise UserError(f"{where}: its aliases are not a mapping; the file is damaged")

    model = build_source(source, where=where, trust_code=trust_code)
    with safe_open(where, framework="pt") as f:
        keys = set(f.keys())
    explicit = metadata.get("explicit_attention")
    if explicit is None:  # a writer that did not say: tell from the keys
        explicit = not any(k.endswith(("in_proj_weight", "q_proj_weight")) for k in keys)
    has_mha = any(type(m) is nn.MultiheadAttention for m in model.modules())
    if explicit and has_mha:
        from wasi_compress.passes.attention import ExplicitAttentionPass

        ExplicitAttentionPass()(model)
    model = apply_structure(model, structure, where=where)

    state = read_state_dict(path)
    for dropped, kept in aliases.items():
        if kept not in state:
            raise UserError(f"{where}: alias {dropped!r} points at {kept!r}, which the file does not hold")
        state[dropped] = state[kept]
    state = {k: (v.to(torch.float32) if v.is_floating_point() else v) for k, v in state.items()}
    load_state_dict_strict(model, state, source=where)
    model.float().eval()
    return model


def build_source(source: dict[str, Any], *, where: str = "checkpoint", trust_code: bool = False) -> nn.Module:
    """The source architecture, without loading weights where the source allows it (builtin models
    have an untrained architecture; timm models are created with pretrained=False). A factory source
    runs code the file names, so it needs ``trust_code`` (the user's word, never the file's)."""
    arch, num_classes, img_size = source["arch"], source.get("num_classes"), source.get("img_size")
    if runs_code(arch) and not trust_code:
        raise UserError(f"{where}: its metadata names the architecture {arch!r}, and building it would import and "
                        "call that code; pass --trust-code (trust_code=True) only if you trust this file, or give "
                        "the architecture yourself with --arch")
    if arch.startswith("builtin:") and img_size is not None:
        entry = builtin_architectures().get(arch[len("builtin:"):])
        if entry is not None and entry.fixed_input_size:
            raise UserError(f"{where}: {arch} has a fixed input size, but the checkpoint names img_size {img_size}")
    if arch.startswith("hf:"):
        from wasi_compress.hf import build_from_source

        return build_from_source(source, where=where)
    return build_architecture(arch, num_classes=num_classes, img_size=img_size, pretrained=False)


def apply_structure(model: nn.Module, structure: list[dict[str, Any]], *, where: str = "checkpoint") -> nn.Module:
    """Put empty SubspaceLinear modules at the structure's sites; returns the model (a GraphModule when
    functional sites had to be rewritten, with the source model's input description copied over)."""
    from wasi_compress.passes.replace import ReplaceLinearsPass

    convs = [e for e in structure if e["module"] == "lowrank_conv"]
    structure = [e for e in structure if e["module"] != "lowrank_conv"]
    model = _apply_linear_structure(model, structure, where, ReplaceLinearsPass)
    for e in convs:
        _put_lowrank_conv(model, e, where)
    return model


def _put_lowrank_conv(model: nn.Module, e: dict[str, Any], where: str) -> None:
    """An empty LowRankConv2d in place of the convolution an entry names (its shape checked)."""
    try:
        conv = model.get_submodule(e["name"])
    except AttributeError:
        conv = None
    if conv is None or not factorable_conv(conv):
        raise UserError(f"{where}: its structure names the convolution {e['name']!r}, which the source "
                        f"architecture {type(model).__name__} does not have as a plain nn.Conv2d")
    if (e["in_features"], e["out_features"], e["bias"]) != (conv.weight[0].numel(), conv.out_channels, conv.bias is not None):
        raise UserError(f"{where}: {e['name']} is {e['out_features']}x{e['in_features']} in the checkpoint but "
                        f"{conv.out_channels}x{conv.weight[0].numel()} in the source architecture")
    if e["rank"] > min(e["in_features"], e["out_features"]):
        raise UserError(f"{where}: {e['name']} has rank {e['rank']}, above its full rank")
    model.set_submodule(e["name"], LowRankConv2d.empty_like(conv, e["rank"], dtype=torch.float32))


def _apply_linear_structure(model: nn.Module, structure: list[dict[str, Any]], where: str, ReplaceLinearsPass) -> nn.Module:
    if not structure:
        return model
    _apply_embeddings(model, [e for e in structure if e["module"] == "embedding"], where)
    structure = [e for e in structure if e["module"] != "embedding"]
    if not structure:
        return model
    entries = {(e["kind"], e["name"]): e for e in structure}
    functional = [e for e in structure if e["kind"] == "functional"]
    target: nn.Module = model
    if functional:
        from wasi_compress.passes.capture import capture

        cap = capture(model, model_example(model, 1), rewrite_attention=False)
        if cap.graph_module is None:
            raise UserError(f"{where}: names functional linear sites, but the source architecture cannot be traced "
                            f"with torch.fx ({cap.note})")
        found = {(s.kind, s.name): s for s in cap.sites}
        sites = []
        for key, e in entries.items():
            site = found.get(key)
            if site is None:
                raise UserError(f"{where}: its structure names the {e['kind']} linear {e['name']!r}, which the source "
                                f"architecture {type(model).__name__} does not have")
            sites.append(site)
        target = cap.graph_module
        copy_model_attributes(model, target)
    else:
        sites = []
        for e in structure:
            try:
                m = model.get_submodule(e["name"])
            except AttributeError:
                m = None
            if not isinstance(m, nn.Linear):
                raise UserError(f"{where}: its structure names the linear module {e['name']!r}, which the source "
                                f"architecture {type(model).__name__} does not have")
            sites.append(LinearSite(name=e["name"], kind="module", role="other", in_features=m.in_features,
                                    out_features=m.out_features, bias=m.bias is not None, weight_name=f"{e['name']}.weight",
                                    bias_name=f"{e['name']}.bias" if m.bias is not None else None))

    def build(site: LinearSite, dense: nn.Linear) -> nn.Module:
        e = entries[(site.kind, site.name)]
        if (e["in_features"], e["out_features"]) != (site.in_features, site.out_features):
            raise UserError(f"{where}: {e['name']} is {e['out_features']}x{e['in_features']} in the checkpoint but "
                            f"{site.out_features}x{site.in_features} in the source architecture")
        return _empty_module(e, dense.weight.device if dense.weight.device.type != "meta" else None, where)

    ReplaceLinearsPass(sites, build)(target)  # through PassBase.__call__: requires/ensures run
    return target


def _apply_embeddings(model: nn.Module, entries: list[dict[str, Any]], where: str) -> None:
    """Empty LowRankEmbedding modules where the structure names factored embeddings."""
    for e in entries:
        try:
            m = model.get_submodule(e["name"])
        except AttributeError:
            m = None
        if type(m) is not nn.Embedding or e["kind"] != "module":
            raise UserError(f"{where}: its structure names the embedding {e['name']!r}, which the source "
                            f"architecture {type(model).__name__} does not have")
        if (e["in_features"], e["out_features"]) != (m.num_embeddings, m.embedding_dim):
            raise UserError(f"{where}: the embedding {e['name']} is {e['in_features']}x{e['out_features']} in the "
                            f"checkpoint but {m.num_embeddings}x{m.embedding_dim} in the source architecture")
        if e["rank"] > min(e["in_features"], e["out_features"]) or e["bias"] or e.get("kept", 0) > e["in_features"]:
            raise UserError(f"{where}: the embedding {e['name']} has rank {e['rank']} or {e.get('kept', 0)} kept rows "
                            "(or a bias), above what it can hold")
        new = LowRankEmbedding.empty(e["in_features"], e["out_features"], e["rank"], kept=e.get("kept", 0))
        new.padding_idx = m.padding_idx
        model.set_submodule(e["name"], new)


def _empty_module(e: dict[str, Any], device, where: str) -> nn.Module:
    """The zero-filled module of a structure entry, its ranks checked against its shape."""
    if e["module"] == "jactus":  # k_L <= out, k_R <= in: the union bases are orthonormal columns
        if e["rank"] > e["out_features"] or e["rank_in"] > e["in_features"]:
            raise UserError(f"{where}: {e['name']} has ranks {e['rank']}, {e['rank_in']}, above its "
                            f"{e['out_features']}x{e['in_features']} shape")
        return JactusLinear.empty(e["in_features"], e["out_features"], e["rank"], e["bias"], rank_in=e["rank_in"],
                                  dtype=torch.float32, device=device)
    if e["rank"] > min(e["in_features"], e["out_features"]):
        raise UserError(f"{where}: {e['name']} has rank {e['rank']}, above its full rank")
    return _MODULE_KINDS[e["module"]].empty(e["in_features"], e["out_features"], e["rank"], e["bias"],
                                            dtype=torch.float32, device=device)


def copy_model_attributes(model: nn.Module, graph_module: fx.GraphModule) -> None:
    """Give a GraphModule the input description of the model it was traced from (timm's pretrained_cfg
    with the real input size), so loaders and commands read the right input shape and normalisation."""
    size, mean, std = data_config(model, None)
    for attr in _MODEL_ATTRS:
        if hasattr(model, attr) and not hasattr(graph_module, attr):
            setattr(graph_module, attr, getattr(model, attr))
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update({"input_size": tuple(size), "mean": tuple(mean), "std": tuple(std)})
    graph_module.pretrained_cfg = cfg


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        names = {v: k for k, v in DTYPES.items()}
        if dtype not in names:
            raise UserError(f"dtype {dtype} cannot be stored; use one of {', '.join(DTYPES)}")
        return names[dtype]
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r} cannot be stored; use one of {', '.join(DTYPES)}")
    return dtype


def _check_source(source: Any, *, where: str) -> dict[str, Any]:
    if not isinstance(source, dict) or not isinstance(source.get("arch"), str) or not source["arch"].strip():
        raise UserError(f"{where}: the checkpoint's source must name an architecture "
                        "(timm:<name>, builtin:<name> or package.module:factory)")
    out = {"arch": source["arch"], "num_classes": source.get("num_classes"), "img_size": source.get("img_size")}
    if source["arch"].startswith("hf:"):  # a transformers class and its config (hf.py), read as data
        out.update(hf_config=source.get("hf_config"), seq_len=source.get("seq_len"))
        if source.get("head") is not None:  # a classification head added to a base encoder (hf.HEADS)
            out["head"] = source["head"]
    for key, low in (("num_classes", 0), ("img_size", 1)):  # timm's num_classes=0: no classifier (EVA-02 tiny)
        if out[key] is not None and (isinstance(out[key], bool) or not isinstance(out[key], int) or out[key] < low):
            raise UserError(f"{where}: the checkpoint's source {key} must be an integer >= {low} or null, got {out[key]!r}")
    return out


def _check_entry(entry: Any, *, where: str) -> dict[str, Any]:
    if not isinstance(entry, dict) or any(k not in entry for k in _STRUCTURE_KEYS):
        raise UserError(f"{where}: a structure entry must have {', '.join(_STRUCTURE_KEYS)}; got {entry!r}")
    e = {k: entry[k] for k in _STRUCTURE_KEYS}
    if entry.get("module") == "jactus":
        e["rank_in"] = entry.get("rank_in")
    if entry.get("module") == "embedding" and "kept" in entry:
        e["kept"] = entry["kept"]
    kinds_ok = isinstance(e["kind"], str) and isinstance(e["module"], str)  # a list or mapping cannot be looked up
    if not kinds_ok or e["kind"] not in ("module", "functional") or e["module"] not in _MODULE_KINDS \
            or not isinstance(e["name"], str):
        raise UserError(f"{where}: structure entry {entry!r}: kind must be module or functional and module one of "
                        f"{', '.join(_MODULE_KINDS)}")
    for key in ("rank", "in_features", "out_features") + tuple(k for k in ("rank_in", "kept") if k in e):
        if isinstance(e[key], bool) or not isinstance(e[key], int) or e[key] < 1:
            raise UserError(f"{where}: structure entry {e['name']!r}: {key} must be a positive integer, got {e[key]!r}")
    if not isinstance(e["bias"], bool):
        raise UserError(f"{where}: structure entry {e['name']!r}: bias must be true or false")
    return e
