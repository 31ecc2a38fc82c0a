"""The JACTUS plan without training: what `finetune --method jactus` would compress and train, for
`analyze --jactus-data` (issue 9: per layer k_w, k_i, k_o, the union ranks and the energy kept)."""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable

from wasi_compress.errors import UserError


def plan_jactus(config, *, loaded=None, on_status: Callable[[str], None] | None = None) -> dict[str, Any]:
    """The plan (``JactusPlan.summary()``) that ``finetune(config)`` would train with: the same data,
    calibration batches, classifier reset and allocation, so the two agree. ``config.method`` must be
    ``jactus``. ``loaded`` (a loaded MODEL) is not changed: the plan is made on a copy."""
    from wasi_compress.finetune.distributed import Dist
    from wasi_compress.finetune.job import FinetuneRun

    if config.method != "jactus":
        raise UserError(f"a JACTUS plan needs method jactus, got {config.method!r}")
    config = dataclasses.replace(config, measure_memory=False, output=None, json_path=None, report_dir=None)
    if loaded is not None:
        loaded = dataclasses.replace(loaded, model=copy.deepcopy(loaded.model))
    run = FinetuneRun(config, Dist(), on_status or (lambda _text: None))
    run.setup(loaded)
    return run.jactus_plan.summary()
