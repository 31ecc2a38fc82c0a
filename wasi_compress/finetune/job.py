"""The `finetune` job: load MODEL and the data, make the model trainable with the `prepare_training_`
transform, measure one step against ordinary fine-tuning, train with a checkpoint and resume state
written after every epoch, and write the finetune/1 document. See the package docstring."""

from __future__ import annotations

import copy
import gc
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wasi_compress import fileio
from wasi_compress.errors import DivergedError, UserError
from wasi_compress.finetune import distributed as dist_utils
from wasi_compress.finetune.config import FinetuneConfig
from wasi_compress.finetune.data import evaluate, permutation, training_data
from wasi_compress.inputs import is_text_model
from wasi_compress.finetune.document import checkpoint_source, document, write_checkpoint
from wasi_compress.finetune.resume import (
    check_resume, compressor_state, load_compressor_state, load_resume, resume_path, save_resume,
)
from wasi_compress.finetune.step_memory import measure_on_copy
from wasi_compress.finetune.steps import after_step_fn, lr_setter, make_run_optimizer, train_step
from wasi_compress.outputs import Outputs, lock_outputs
from wasi_compress.passes.training import BLOCK_ROLES, block_of


@dataclass
class FinetuneResult:
    doc: dict[str, Any]             # the wasi-compress/finetune/1 document
    model: nn.Module                # the trained model, with its training modules
    output: Path | None = None
    notes: list[str] = field(default_factory=list)


def finetune(config: FinetuneConfig, *, loaded=None,
             on_step: Callable[[int, int, int, float, float], None] | None = None,
             on_epoch: Callable[[int, dict[str, Any]], None] | None = None,
             on_status: Callable[[str], None] | None = None) -> FinetuneResult:
    """Run a fine-tuning (see the package docstring). Callbacks (rank 0 only): on_step(epoch, step,
    steps, running loss, running train accuracy), on_epoch(epoch, {loss, accuracy, ...}), on_status(text).
    The input (MODEL, or ``loaded``) is changed: it becomes the trained model."""
    from wasi_compress.loading import resolve_device

    resolve_device(config.device)  # one line, not a traceback, for a device torch cannot use
    with dist_utils.distributed(config) as info, lock_outputs(config.output_paths().values() if info.main else ()):
        run = FinetuneRun(config, info, on_status if (on_status and info.main) else (lambda _t: None))
        run.setup(loaded)
        run.measure()
        run.train(on_step if info.main else None, on_epoch if info.main else None)
        return run.finish()


class FinetuneRun:
    """The state of one run, built up by setup, measure, train and finish (each a step of `finetune`)."""

    def __init__(self, config: FinetuneConfig, info: dist_utils.Dist, status: Callable[[str], None]):
        self.config, self.dist, self.status = config, info, status
        self.notes: list[str] = []
        self.history: list[dict[str, float]] = []
        self.step_times: list[float] = []
        self.start_epoch = 0
        self.memory = self.memory_vanilla = None
        self.state = None
        torch.manual_seed(config.seed)

    # -- setup ----------------------------------------------------------------------------------
    def setup(self, loaded) -> None:
        self.loaded = loaded = self._load(loaded)
        config = self.config  # resolved for the model (its default threshold)
        model = loaded.model.to(config.device)
        n_calib = min(config.batch_size, len(self.data.train))
        self.calib_x = self.data.batch(self.data.train.images[:n_calib])
        self.calib_y = self.data.train.labels[:n_calib].to(config.device)
        if config.resume:
            self.state = load_resume(resume_path(config.output))
            check_resume(config, self.state, self.dist.world, resume_path(config.output))
        self._prepare(model)
        self.optimizer = make_run_optimizer([p for p in self.model.parameters() if p.requires_grad], config)
        if self.state is not None:
            self._restore()

    def _load(self, loaded):
        from wasi_compress.loading import load_model

        config = self.config
        self.status("loading the model")
        if loaded is None:
            loaded = load_model(config.model, arch=config.arch, weights=config.weights, trust_pickle=config.trust_pickle,
                                trust_code=config.trust_code,
                                num_classes=config.num_classes, img_size=config.img_size, seq_len=config.seq_len)
        self.config = config = config.resolved(text_model=is_text_model(loaded.model))  # the default threshold
        self.status("loading the data")
        self.data = training_data(config, loaded)
        self.notes += self.data.notes
        self.source = checkpoint_source(config, loaded, self._reset_classifier(loaded))
        if config.output and self.source is None:
            raise UserError(f"{config.model}: a pickled module names no architecture, so no checkpoint can be written; "
                            "give the architecture with --arch")
        return loaded

    def _reset_classifier(self, loaded) -> int | None:
        """A classifier whose size differs from the data's classes is reset (timm reset_classifier); a base
        text encoder (hidden states out) gets a classification head (hf.HFTextModel.add_head)."""
        model, classes = loaded.model, self.data.num_classes
        if loaded.num_classes is None and is_text_model(model):
            return self._add_text_head(model, classes)
        if loaded.num_classes is None or loaded.num_classes == classes:
            return None
        if not hasattr(model, "reset_classifier"):
            raise UserError(f"the data has {classes} classes but the model's classifier has {loaded.num_classes}, "
                            "and the model has no reset_classifier()")
        torch.manual_seed(self.config.seed)
        model.reset_classifier(classes)
        self.notes.append(f"classifier reset from {loaded.num_classes} to {classes} classes (the data's)")
        return classes

    def _add_text_head(self, model: nn.Module, classes: int) -> int:
        if not hasattr(model, "add_head"):
            raise UserError(f"{self.config.model} outputs hidden states and has no classification head to add; "
                            "give an hf: text model or a checkpoint of one")
        torch.manual_seed(self.config.seed)
        model.add_head(classes)
        self.notes.append(f"added a classification head to the encoder: the mean of its last hidden state over the "
                          f"attention mask, then a linear to {classes} classes (saved in the checkpoint)")
        return classes

    def _prepare(self, model: nn.Module) -> None:
        """The `prepare_training_` transform and the memory levers, with a dense twin kept for the vanilla
        measurement. Under --memory-budget the step is planned first (on copies), then checked: a step whose
        measured peak exceeds the budget is planned again under a budget tightened by the overshoot."""
        from wasi_compress.passes.attention import ExplicitAttentionPass

        ExplicitAttentionPass()(model)  # before the twin, so both name their projections alike
        twin = copy.deepcopy(model) if (self.config.measure_memory and self.dist.main) else None
        self.step_plan = None
        self.levers = self._resumed_levers() or self._manual_levers()
        budget = self.config.memory_budget_bytes
        if budget is not None and self.state is None:
            planned = self._plan_and_check(copy.deepcopy(model), budget) if self.dist.main else None
            # rank 0 plans (measurements differ between processes); every process takes its plan
            self.step_plan, self.levers, self.memory = dist_utils.gather_objects(planned, self.dist)[0]
            self.notes += self.step_plan.notes
            handle = self._insert(model)  # the model passed in becomes the one trained
        else:
            handle = self._insert(model)
        self.handle, self.model, self.layers = handle, handle.model, handle.layers
        if twin is not None:  # the same trainable parameters as the run (finetune_last froze some)
            frozen = set(handle.frozen)
            for name, p in twin.named_parameters():
                if name in frozen:
                    p.requires_grad_(False)
        self.dense_twin = twin
        self._plan_of(handle)
        self._prepare_notes(handle)

    def _plan_and_check(self, dense: nn.Module, budget: int):
        """Plan under `budget` and confirm the plan by measuring its step on a copy (memory_budget.plan_and_check).
        Returns (plan, levers, measured step)."""
        from wasi_compress.finetune.memory_budget import plan_and_check, plan_inputs_for

        self.status(f"planning the step under {self.config.memory_budget}")
        inputs = plan_inputs_for(dense, self.config, self.calib_x, self.calib_y, self.status)

        def measure(step):
            self.step_plan, self.levers = step, step.levers
            measured = self._measure_self(self._insert(copy.deepcopy(dense), final=False))
            return measured["peak_bytes"], measured

        step, measured = plan_and_check(inputs, budget, measure, f"--memory-budget {self.config.memory_budget}")
        return step, step.levers, measured

    def _manual_levers(self):
        from wasi_compress.step_plan import StepLevers

        c = self.config
        return StepLevers(micro_batches=c.micro_batches, recompute=c.recompute, layernorm="exact", attention="as-is",
                          linear_inputs="tucker" if c.method in ("wasi", "asi") else "exact", frozen_dtype=c.frozen_dtype)

    def _resumed_levers(self):
        from wasi_compress.step_plan import StepLevers

        text = (self.state or {}).get("levers")
        data = json.loads(text) if text else None
        return StepLevers.from_dict(data) if data else None

    def _insert(self, model: nn.Module, final: bool = True):
        """prepare_training_ with the run's ranks (planned, resumed or by threshold), then the levers
        (``final``: the run's own model, whose notes are kept)."""
        from wasi_compress.finetune.memory_budget import prepare_with_levers_

        if self.config.method == "jactus":
            return self._insert_jactus(model, final)
        state = self.state
        weight_ranks = state["weight_ranks"] if state is not None else (
            self.step_plan.weight_ranks if self.step_plan is not None else None)
        self.status("inserting training modules")
        handle, notes = prepare_with_levers_(model, self.config, self.levers, example=self.calib_x[:2],
                                             calib=(self.calib_x, self.calib_y), weight_ranks=weight_ranks,
                                             activation_ranks=None if state is None else state["activation_ranks"])
        self.notes += notes if final else []
        return handle

    def _insert_jactus(self, model: nn.Module, final: bool):
        """The jactus_ transform on `calib_batches` batches of the training split (its first images, in
        order: the same plan for the same model and data, which is also how --resume rebuilds it)."""
        from wasi_compress.passes.training import TrainingLayer
        from wasi_compress.transforms.jactus import jactus_
        from wasi_compress.transforms.training import TrainingHandle

        c, train = self.config, self.data.train
        n = min(len(train), c.calib_batches * c.batch_size)
        batches = [(self.data.batch(train.images[i:i + c.batch_size]), train.labels[i:i + c.batch_size].to(c.device))
                   for i in range(0, n, c.batch_size)]
        self.status(f"JACTUS: calibrating on {n} training examples and allocating ranks")
        plan = jactus_(model, c.jactus_config(), calib=batches, example=self.calib_x[:2])
        from wasi_compress.passes.capture import capture

        cap = capture(model, self.calib_x[:2])
        chosen = {layer["name"]: layer for layer in plan.layers}
        layers = []
        for site in cap.sites:
            entry = chosen.get(site.name)
            block = block_of(site.name)
            if entry is None:
                layers.append(TrainingLayer(site.name, site.role, block, "dense", True, note="kept dense and trainable"))
                continue
            k = entry["chosen"]
            layers.append(TrainingLayer(site.name, site.role, block, "jactus", True, weight_rank=k["k_left"],
                                        note=f"JACTUS k_w={k['k_w']} k_i={k['k_i']} k_o={k['k_o']}: "
                                             f"Q_L {k['k_left']}, Q_R {k['k_right']} wide; only the core and bias train"))
        blocks = list(dict.fromkeys(b for b in (block_of(n) for n in chosen) if b is not None))
        if final:
            self.jactus_plan = plan
            self.notes += plan.notes
        from wasi_compress.transforms.config import WasiConfig

        return TrainingHandle(model, WasiConfig(method="vanilla"), layers, [], blocks, cap)

    def _measure_self(self, handle) -> dict[str, Any]:
        self.status("measuring one training step (this method)")
        return measure_on_copy(handle.model, self.config, self.calib_x, self.calib_y, self._linears(handle),
                               micro_batches=self.levers.micro_batches)

    @staticmethod
    def _linears(handle) -> dict[str, str]:
        return {s.name: s.role for s in handle.capture.sites if s.kind == "module"}

    jactus_plan = None  # the JactusPlan of a --method jactus run

    def _plan_of(self, handle) -> None:
        if self.state is not None:
            self.activation_plan = self.state["activation_ranks"]
            self.planning = json.loads(self.state["planning"])
        elif handle.activation_plan is not None:
            self.activation_plan, self.planning = handle.activation_plan.ranks, handle.activation_plan.to_dict()
        else:
            self.activation_plan = self.planning = None
        self.weight_ranks = {layer.name: layer.weight_rank for layer in self.layers
                             if layer.role in BLOCK_ROLES and layer.block in handle.blocks}

    def _prepare_notes(self, handle) -> None:
        cap = handle.capture
        if cap.method != "fx":
            self.notes.append(f"capture used forward hooks: {cap.note}")
        for item in cap.skipped:
            self.notes.append(f"skipped {item['name']}: {item['reason']}")
        if self.config.finetune_last is not None:
            self.notes.append(f"only the last {self.config.finetune_last} blocks ({', '.join(handle.blocks)}) and what "
                              f"runs after them are trained; {len(handle.frozen)} parameters before them are frozen "
                              "and save no activations")
        for layer in self.layers:
            if layer.note and layer.module != "dense":
                self.notes.append(f"{layer.name}: {layer.note}")
        self.notes.append("the classifier head and layers outside the transformer blocks stay dense and trainable")

    def _restore(self) -> None:
        state, device = self.state, self.config.device
        self.model.load_state_dict({k: v.to(device) for k, v in state["model"].items()})
        self.optimizer.load_state_dict(state["optimizer"])
        load_compressor_state(self.model, state["per_rank"][self.dist.rank]["compressors"], device)
        self.start_epoch = int(state["epoch"])
        self.history, self.step_times = list(state["history"]), list(state["step_times"])

    # -- measure --------------------------------------------------------------------------------
    def measure(self) -> None:
        """One step of this model and one of ordinary fine-tuning of the same model, on copies."""
        if self.dense_twin is not None:
            if self.memory is None:
                self.memory = self._measure_self(self.handle)
            self.status("measuring one training step (vanilla fine-tuning)")
            self.memory_vanilla = measure_on_copy(self.dense_twin, self.config, self.calib_x, self.calib_y,
                                                  self._linears(self.handle), ordinary=True)
            self.dense_twin = None
            gc.collect()

    # -- train ----------------------------------------------------------------------------------
    def train(self, on_step, on_epoch) -> None:
        config, info = self.config, self.dist
        train_model = self.model
        if info.active:
            from torch.nn.parallel import DistributedDataParallel

            train_model = DistributedDataParallel(self.model)
            self.notes.append(f"DDP over {info.world} processes; memory was measured in one process without DDP")
        if self.state is None:
            torch.manual_seed(config.seed + info.rank)
        else:
            torch.set_rng_state(self.state["per_rank"][info.rank]["rng"])
        self.steps = math.ceil(len(self.data.train) / config.batch_size)
        set_lr = lr_setter(self.model, self.optimizer, config, self.steps)
        after_step = after_step_fn(self.model)
        self.model.train()
        for epoch in range(self.start_epoch, config.epochs):
            totals = self._epoch(epoch, train_model, set_lr, after_step, on_step)
            record = self._end_epoch(epoch, totals)
            if on_epoch:
                on_epoch(epoch, record)
            dist_utils.barrier(info)

    def _epoch(self, epoch: int, train_model, set_lr, after_step, on_step) -> torch.Tensor:
        config, info, data = self.config, self.dist, self.data
        perm = permutation(len(data.train), config.seed, epoch)
        totals = torch.zeros(3, dtype=torch.float64)  # loss sum, correct, seen
        for step in range(self.steps):
            idx = perm[step * config.batch_size:(step + 1) * config.batch_size][info.rank::info.world]
            x = data.batch(data.train.images[idx])
            y = data.train.labels[idx].to(config.device)
            set_lr(epoch * self.steps + step)
            start = time.perf_counter()
            loss, out = train_step(train_model, self.optimizer, x, y, after_step, self.levers.micro_batches)
            self.step_times.append(time.perf_counter() - start)
            self._check_finite(math.isfinite(float(loss)), epoch, step + 1, f"the loss is {float(loss)}")
            totals += torch.tensor([float(loss) * len(idx), float((out.argmax(-1) == y).sum()), len(idx)],
                                   dtype=torch.float64)
            if on_step:
                on_step(epoch, step + 1, self.steps, float(totals[0] / totals[2]), float(totals[1] / totals[2]))
        finite = all(bool(torch.isfinite(t).all()) for t in self.model.state_dict().values() if t.is_floating_point())
        self._check_finite(finite, epoch, self.steps, "the weights are not finite numbers")
        return totals

    def _check_finite(self, finite: bool, epoch: int, step: int, what: str) -> None:
        """Stop at the first loss (or weights) that is not a finite number: training diverged. Every process
        agrees (one flag, all-reduced), so DDP ranks stop together; nothing of this epoch is written."""
        bad = torch.tensor([0.0 if finite else 1.0], dtype=torch.float64)
        dist_utils.all_reduce_(bad, self.dist)
        if not bad.item():
            return
        kept = (f"the checkpoint of epoch {epoch} in {self.config.output} is kept" if self.config.output and epoch
                else "no checkpoint was written")
        raise DivergedError(f"training diverged: {what} at epoch {epoch + 1}, "
                            f"step {step} of {self.steps}; lower --lr (it is {self.config.effective_lr:g}); {kept}",
                            epoch + 1, step)

    def _end_epoch(self, epoch: int, totals: torch.Tensor) -> dict[str, float]:
        info = self.dist
        dist_utils.all_reduce_(totals, info)
        accuracy = torch.tensor([evaluate(self.model, self.data) if info.main else 0.0], dtype=torch.float64)
        dist_utils.broadcast_(accuracy, info)
        record = {"loss": float(totals[0] / totals[2]), "accuracy": float(accuracy[0]),
                  "train_accuracy": float(totals[1] / totals[2])}
        self.history.append(record)
        per_rank = dist_utils.gather_objects({"rng": torch.get_rng_state(), "compressors": compressor_state(self.model)}, info)
        if info.main and self.config.output:
            self._write_epoch(epoch + 1, record, per_rank)
        return record

    def _checkpoint_meta(self, **more) -> dict[str, Any]:
        c = self.config
        return {"finetune": {"method": c.method, "update": c.update if c.method == "wasi" else None, "seed": c.seed,
                             "data": c.data, "lr": c.effective_lr, "schedule": c.schedule, "optimizer": c.optimizer,
                             "threshold": c.threshold, "activation_threshold": c.activation_threshold,
                             "finetune_last": c.finetune_last, "activation_plan": self.activation_plan,
                             "jactus": None if self.jactus_plan is None else self.jactus_plan.summary(),
                             "layers": [layer.to_dict() for layer in self.layers], **more}}

    def _write_epoch(self, epochs_done: int, record, per_rank) -> None:
        """The checkpoint and the resume state, committed together."""
        config = self.config
        with Outputs() as outputs:
            meta = self._checkpoint_meta(epochs_done=epochs_done, accuracy=record["accuracy"])
            # the resume state is staged (so renamed) first: a kill between the two renames leaves a state
            # that resumes this epoch (it holds the model itself), never a checkpoint without its state
            save_resume(resume_path(config.output), outputs, config=config, epoch=epochs_done, model=self.model,
                        optimizer=self.optimizer, history=self.history, step_times=self.step_times,
                        weight_ranks=self.weight_ranks, activation_ranks=self.activation_plan,
                        planning=self.planning, per_rank=per_rank, levers=self.levers.to_dict())
            write_checkpoint(config.output, outputs, self.model, self.handle.capture.sites, self.source, meta)
            outputs.commit()

    def _catch_up_checkpoint(self) -> None:
        """A run killed between the two renames of its last epoch left the resume state one epoch ahead of
        the checkpoint: write the checkpoint from the state, as that epoch would have."""
        from wasi_compress.weights import wasi_checkpoint_metadata

        output = Path(self.config.output)
        try:
            done = wasi_checkpoint_metadata(output).get("finetune", {}).get("epochs_done") if output.is_file() else None
        except (UserError, AttributeError):  # damaged: rewrite it
            done = None
        if done == self.start_epoch or not self.history:
            return
        with Outputs() as outputs:
            meta = self._checkpoint_meta(epochs_done=self.start_epoch, accuracy=self.history[-1]["accuracy"])
            write_checkpoint(self.config.output, outputs, self.model, self.handle.capture.sites, self.source, meta)
            outputs.commit()
        held = "no checkpoint" if done is None else f"the checkpoint of epoch {done}"
        self.notes.append(f"{output} held {held} while its resume state held epoch {self.start_epoch} (a run stopped "
                          "between writing the two); the checkpoint was rewritten from the resume state")

    # -- finish ---------------------------------------------------------------------------------
    def finish(self) -> FinetuneResult:
        config, main = self.config, self.dist.main
        trained_now = self.history and self.start_epoch < config.epochs
        final_accuracy = self.history[-1]["accuracy"] if trained_now else (evaluate(self.model, self.data) if main else 0.0)
        if not trained_now and main and config.output and self.start_epoch >= config.epochs:
            self.notes.append(f"the resume state already holds {self.start_epoch} epochs; nothing was trained")
            self._catch_up_checkpoint()
        doc = document(config, self, final_accuracy)
        if main:
            with Outputs() as outputs:
                if config.json_path:
                    outputs.then(lambda: _json(config.json_path, doc))
                if config.report_dir:
                    from wasi_compress.report_html import write_report

                    outputs.then(lambda: write_report(config.report_dir, finetune=doc))
                outputs.commit()
        return FinetuneResult(doc, self.model, Path(config.output) if config.output else None, self.notes)


def _json(path: str, doc: dict[str, Any]) -> Path | None:
    """Write the document (to stdout for '-'); the path written, so a failed commit removes it."""
    fileio.write_json(path, doc)
    return None if path == "-" else Path(path)
