"""Memory-efficient fine-tuning as a job over files: train a model in its weight subspace with compressed activations,
measure what a step costs against ordinary fine-tuning, checkpoint every epoch, resume exactly, run under DDP.

``finetune(FinetuneConfig(...))`` is the API behind ``wasi-compress finetune``:

1. load MODEL and the data (``mnist``, ``digits`` or an image folder, with the fixed held-out split of
   ``wasi_compress.data``); images are resized / converted to the model's input per batch and the notes
   say so; a classifier whose size differs from the data's classes is reset (timm ``reset_classifier``).
   A text model takes a text task instead (``text:FILE``, ``text:TRAIN,TEST`` or ``stdlib-docs``;
   text_data.py, stdlib_docs.py), tokenized with its own tokenizer; a base encoder gets a mean-pool
   classification head (``hf.HFTextModel.add_head``), recorded in the checkpoint's source;
2. with ``--finetune-last N``, freeze everything that runs before the last N blocks (nothing is saved for
   backward there);
3. with ``--activation-budget``, plan per-layer Tucker ranks of the saved inputs under that many bytes
   (``passes.training.plan_activation_ranks``; errors are relative weight-gradient errors on a calibration
   batch, the first ``batch_size`` training images);
4. insert the training modules (the ``prepare_training_`` transform, ``passes.training.TrainingPass``): ``wasi`` = WASILinear (weight rank at
   ``threshold`` of the weight energy, ``update`` rule ``subspace-iteration`` (the paper's: L, R are
   updated inside backward by plain SGD at ``lr``) or ``optimizer-step`` (old spelling ``factored``: L, R trained by the optimizer and
   re-orthonormalised after each step)) with a TuckerCompressor; ``asi`` = ASILinear; ``vanilla``;
   the classifier head and every layer outside the blocks stay dense and trainable;
5. measure one training step of this model and of ordinary (vanilla) fine-tuning of the same model, on
   copies, so training is not disturbed (see ``measure_step``);
6. train for ``epochs`` (learning rate: cosine decay from ``lr`` over the run, or constant), evaluate the held-out split after every epoch, and
   write the checkpoint (``OUT``, safetensors through ``wasi_compress.checkpoint``: WASI layers become
   SubspaceLinear, ASI layers plain Linear) and the resume state (``OUT.resume.pt``) atomically after
   every epoch. ``resume=True`` continues from the resume state to the same result as an uninterrupted
   run with the same seed: model, optimizer, RNG, the subspace-iteration factors (buffers of the model)
   and every Tucker compressor's ranks and warm-start factors are restored.

With ``step_in_backward`` each parameter's optimizer step runs inside backward as soon as its gradient is
ready and the gradient is dropped (``wasi_compress.optim.StepInBackward``): same weights, no gradient
tensors held after backward. The vanilla baseline is always measured with an ordinary step.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) the process group is initialised (gloo on CPU,
nccl on CUDA), the model is wrapped in DistributedDataParallel and each global batch of ``batch_size``
images is split across the processes. The optimizer-step rule (and asi, vanilla) work under DDP; the
subspace-iteration rule is refused, because its in-backward update uses the local gradient only and the
replicas would drift apart. Rank 0 measures, evaluates and writes the outputs::

    torchrun --nproc-per-node 2 .venv/bin/wasi-compress finetune builtin:mnist-vit --data digits \\
        --method wasi --update optimizer-step --epochs 5 -o out/ddp.safetensors --json out/ddp.json

Layout: config.py (FinetuneConfig), data.py (the splits), text_data.py and stdlib_docs.py (text tasks),
steps.py (one step, schedule, optimizer), step_memory.py (measuring a step), resume.py (the resume state),
distributed.py (process group set-up and tear-down), document.py (finetune/1 and the checkpoint), job.py
(the run).
"""

from __future__ import annotations

import sys
import types

from wasi_compress.finetune.config import DEFAULT_LR, OPTIMIZERS, SCHEDULES, FinetuneConfig
from wasi_compress.finetune.job import FinetuneResult, finetune
from wasi_compress.finetune.resume import resume_path
from wasi_compress.finetune.step_memory import measure_step
from wasi_compress.finetune.steps import after_step_fn, learning_rate, train_step

__all__ = ["DEFAULT_LR", "FinetuneConfig", "FinetuneResult", "OPTIMIZERS", "SCHEDULES", "after_step_fn", "finetune",
           "learning_rate", "measure_step", "resume_path", "train_step"]


# `wasi_compress.finetune` is both this package and the function, like `wasi_compress.convert`.
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return finetune(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
