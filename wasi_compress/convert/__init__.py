"""`convert`: the most faithful low-rank model that fits a byte budget, as a job over files.

The work is the `lowrank_` transform (wasi_compress/transforms/lowrank.py: candidates, exact DP
planning, factoring); this package adds what the command needs around it: its config with the CLI's
flags (config.py), calibration and evaluation images (images.py), the convert/1 document (document.py),
the architecture and structure a checkpoint records (sources.py) and the job itself (job.py), which
does all the work first and writes files last, all or none, the ONNX export checked before anything
is written."""

from __future__ import annotations

import sys
import types

from wasi_compress.convert.config import ConvertConfig
from wasi_compress.convert.document import SCHEMA
from wasi_compress.convert.job import ConvertResult, convert

__all__ = ["SCHEMA", "ConvertConfig", "ConvertResult", "convert"]


# `wasi_compress.convert` is both this package and the function: `from wasi_compress import convert;
# convert(model, config)` works, and so does `from wasi_compress.convert import ConvertConfig`.
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
