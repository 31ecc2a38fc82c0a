"""The finetune/1 document (docs/schemas.md) and the checkpoint a run writes after every epoch."""

from __future__ import annotations

import copy
import statistics
from typing import Any

from torch import nn

from wasi_compress.finetune.step_memory import SOURCES as STEP_SOURCES
from wasi_compress.inputs import is_text_model
from wasi_compress.reports import FinetuneReport, Source
from wasi_compress.transforms.training import to_inference_

SOURCES = {
    "final.accuracy": Source("measured", "held-out split after the last epoch"),
    "step_time_median_s": Source("measured", "median wall time of the training steps of this run (forward, "
                                 "backward, optimizer step, re-orthonormalisation), batch preparation excluded"),
    "memory_plan.predicted": Source("derived", "the whole-step memory model of wasi_compress.step_plan: parameters, "
                                    "gradients, optimizer state and the batch from tensor sizes, activations measured "
                                    "at two small micro-batch sizes and extrapolated linearly"),
    "memory_vanilla": Source("measured", "one step of ordinary fine-tuning (dense linears, exact activations) of "
                             "the same model with the same optimizer and the same trainable parameters"),
}
# the step figures' prose lives beside them, in memory.sources; their kinds are also listed by dotted path
MEMORY_KINDS = {f"{part}.{k}": s for part in ("memory", "memory_vanilla") for k, s in STEP_SOURCES.items()}


def checkpoint_source(config, loaded, num_classes: int | None) -> dict[str, Any] | None:
    """The architecture the checkpoint records (None: a pickled module names none)."""
    from wasi_compress.architectures import checkpoint_source

    # a checkpoint MODEL records its own classes; only a classifier reset here changes them
    recorded = num_classes if (num_classes is not None or loaded.metadata) else config.num_classes
    source = checkpoint_source(config.model, arch=config.arch, img_size=config.img_size, metadata=loaded.metadata,
                               num_classes=recorded)
    hf_source = getattr(loaded.model, "hf_source", None)
    # an hf: model records its class and config (hf.py); a text model always, as finetune may have added a
    # head to it (builtin:minilm included: its builtin source would rebuild without one)
    if isinstance(hf_source, dict) and (source is None or is_text_model(loaded.model)):
        source = {**hf_source, "num_classes": getattr(loaded.model, "num_classes", None), "img_size": None}
    return source


def write_checkpoint(path: str, outputs, model: nn.Module, sites, source, extra) -> None:
    """Stage the inference form of `model` (WASI layers as SubspaceLinear, ASI as nn.Linear) at `path`."""
    from wasi_compress.checkpoint import save_checkpoint, structure_entry
    from wasi_compress.modules.jactus import JactusLinear
    from wasi_compress.modules.subspace import SubspaceLinear

    from wasi_compress.frozen_storage import restore_frozen_dtype_

    export = to_inference_(copy.deepcopy(model)).eval()
    restore_frozen_dtype_(export)  # frozen parameters kept in bfloat16 are written as float32, like the rest
    from wasi_compress.modules.lowrank_conv import LowRankConv2d
    from wasi_compress.passes.capture import LinearSite

    structure = []
    for site in sites:
        try:
            m = export.get_submodule(site.name)
        except AttributeError:
            continue
        if isinstance(m, (SubspaceLinear, JactusLinear)):
            structure.append(structure_entry(site, m))
    for name, m in export.named_modules():  # 1x1 convolutions trained in a subspace (modules/pointwise.py)
        if isinstance(m, LowRankConv2d):
            structure.append(structure_entry(LinearSite(name, "conv", "conv", m.in_features, m.out_features,
                                                        m.second.bias is not None, f"{name}.weight", None), m))
    outputs.stage(path, lambda tmp: save_checkpoint(tmp, export, source=source, structure=structure, extra=extra,
                                                    dtype="float32"))


def document(config, run, final_accuracy: float) -> dict[str, Any]:
    """``run``: the FinetuneRun (its loaded model, layers, history, measurements, plan, notes, data)."""
    def public(m):
        return None if m is None else {k: v for k, v in m.items() if k != "per_layer"}

    body = {
        "model": config.model, "data": config.data, "method": config.method,
        "update": config.update if config.method == "wasi" else None, "seed": config.seed,
        "optimizer": config.optimizer, "lr": config.effective_lr, "momentum": config.effective_momentum,
        "step_in_backward": config.in_backward, "schedule": config.schedule,
        "batch_size": config.batch_size, "threshold": config.threshold if config.method == "wasi" else None,
        "activation_threshold": config.activation_threshold if config.method in ("wasi", "asi") else None,
        "finetune_last": config.finetune_last, "world_size": run.dist.world,
        "train_images": len(run.data.train), "test_images": len(run.data.test),
        "epochs": run.history, "final": {"accuracy": final_accuracy},
        "memory": public(run.memory), "memory_vanilla": public(run.memory_vanilla),
        "step_time_median_s": statistics.median(run.step_times) if run.step_times else None,
        "activation_plan": run.activation_plan, "activation_planning": run.planning,
        "levers": run.levers.to_dict(),
        "memory_plan": None if run.step_plan is None else run.step_plan.to_dict(),
        "layers": [layer.to_dict() for layer in run.layers], "output": config.output, "notes": run.notes,
        "config": config.to_dict(),
        "jactus": None if run.jactus_plan is None else run.jactus_plan.to_dict(),
    }
    if run.memory is not None:
        body["memory_per_layer"] = run.memory["per_layer"]
    return FinetuneReport(body, SOURCES, MEMORY_KINDS if run.memory is not None else {}).to_dict()

