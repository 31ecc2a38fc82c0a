"""`FinetuneConfig`: every setting a fine-tuning run depends on, with the CLI's flags in its errors;
`wasi_config()` is the part the `prepare_training_` transform takes."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wasi_compress.errors import UserError
from wasi_compress.modules.training import UPDATE_RULES, canonical_update
from wasi_compress.passes.training import CALIBRATION_THRESHOLDS
from wasi_compress.passes.training import METHODS as TRAINING_METHODS
from wasi_compress.transforms.config import WasiConfig

# jactus compresses and adapts in one go (wasi_compress.transforms.jactus); the others go through
# prepare_training_
METHODS = TRAINING_METHODS + ("jactus",)
DEFAULT_RETAIN = 0.8  # jactus without --retain or --budget: the paper's headline setting

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "constant")
# The defaults are the recipe that keeps WASI's accuracy beside vanilla's (benchmarks/bench_transfer.txt):
# SGD with momentum 0.9 at peak lr 0.01, cosine; WASI trains L, R with the optimizer (optimizer-step) at
# weight threshold 0.6 and Tucker threshold 0.98, its optimizer step inside backward where it can run
# (0.7 also kept accuracy but left the linear layers only 8.6x smaller on the harder mnist-rot transfer,
# whose noisy inputs need higher Tucker ranks).
# Vanilla gets the same optimizer. The paper's settings (SGD without momentum at lr 0.05, the
# subspace-iteration rule, threshold 0.8) are an option: --momentum 0 --update subspace-iteration
# --threshold 0.8 (lr 0.05 is the default without momentum).
DEFAULT_LR = {"sgd": 0.01, "sgd-no-momentum": 0.05, "adamw": 3e-4}
# The weight threshold without --threshold: 0.6 for image models (above); TEXT_THRESHOLD for text models.
# A pretrained text encoder's weights carry what it knows in more of their spectrum: on builtin:minilm ->
# stdlib-docs (one epoch) WASI reached 21.0% held-out at 0.6, 45.7% at 0.8, 53.0% at 0.9 and 60.3%
# at 0.95, against vanilla's 57.3% (benchmarks/finetune_minilm_stdlib_docs.txt)
DEFAULT_THRESHOLD = 0.6
TEXT_THRESHOLD = 0.95
# JACTUS trains only the cores C in fixed bases: a step on C moves W by the gradient projected onto the
# union subspace, with no factor to amplify it (a step on L, R of W = L R moves W by about
# L L^T G + G R^T R), so at lr 0.01 it lagged on mnist-rot (61.7% on seed 0); lr 0.03 gave 65.2% and 0.05
# 56.0% (benchmarks/bench_jactus.txt, the diagnosis rows)
JACTUS_LR = 0.03
DEFAULT_MOMENTUM = 0.9


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run depends on; validates itself and round-trips through JSON."""

    model: str
    data: str
    method: str = "wasi"
    update: str = "optimizer-step"
    threshold: float | None = None  # None: DEFAULT_THRESHOLD, or TEXT_THRESHOLD for a text model (see resolved)
    # 0.98: on builtin:mnist-vit -> digits the relative weight-gradient error of Tucker ranks at 0.8 of the
    # activation energy is 0.5-0.7 per layer (at 0.95: 0.2-0.4), which costs accuracy (0.95 left WASI 0.56
    # points behind vanilla), while the compressed inputs stay small beside the weights
    activation_threshold: float = 0.98
    activation_budget: str | int | None = None
    epochs: int = 5
    batch_size: int = 64
    lr: float | None = None
    optimizer: str = "sgd"
    schedule: str = "cosine"
    momentum: float | None = None  # None: 0.9 for SGD (DEFAULT_MOMENTUM); AdamW has none
    weight_decay: float = 0.0
    # each parameter's optimizer step runs in backward as soon as its gradient is ready, and the gradient
    # is dropped (wasi_compress.optim.StepInBackward): gradients never all exist at once
    # None (the default): on wherever it can run, i.e. in one process, with no micro-batches and no
    # --memory-budget (whose plan may accumulate micro-batches)
    step_in_backward: bool | None = None
    finetune_last: int | None = None
    # whole-step memory: a budget the planner fits the step into (wasi_compress.step_plan), or the two
    # exact levers by hand (chunks whose gradients accumulate; per-block recomputation)
    memory_budget: str | int | None = None
    micro_batches: int = 1
    recompute: bool = False
    frozen_dtype: str = "float32"  # bfloat16: what --finetune-last froze is stored in half the bytes
    allow_unchanged: bool = False  # --method wasi/asi that would replace no layer: refused unless set
    seed: int = 0
    resume: bool = False
    output: str | None = None
    json_path: str | None = None
    report_dir: str | None = None
    device: str = "cpu"
    arch: str | None = None
    weights: str | None = None
    trust_pickle: bool = False
    trust_code: bool = False
    num_classes: int | None = None
    img_size: int | None = None
    seq_len: int | None = None  # a text model's padded token length (None: 128, capped at its positions)
    calibration_thresholds: tuple[float, ...] = CALIBRATION_THRESHOLDS
    measure_memory: bool = True
    # --method jactus: the retained share of the model's parameters (or --budget, bytes of them in float32)
    # and the training batches its covariances are estimated on
    retain: float | str | None = None
    budget: str | int | None = None
    calib_batches: int = 4

    def __post_init__(self):
        self._check_model_and_data()
        if self.method not in METHODS:
            raise UserError(f"--method must be one of {', '.join(METHODS)}, got {self.method!r}")
        self.update = canonical_update(self.update)
        if self.update not in UPDATE_RULES:
            raise UserError(f"--update must be one of {', '.join(UPDATE_RULES)}, got {self.update!r}")
        if self.optimizer not in OPTIMIZERS:
            raise UserError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise UserError(f"--schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        for name in ("threshold", "activation_threshold"):
            value = getattr(self, name)
            if name == "threshold" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in (0, 1], got {value!r}")
            setattr(self, name, float(value))
        for name, low in (("epochs", 0), ("batch_size", 1), ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"--{name.replace('_', '-')} must be an integer >= {low}, got {value!r}")
        if self.finetune_last is not None and (isinstance(self.finetune_last, bool) or not isinstance(self.finetune_last, int)
                                               or self.finetune_last < 1):
            raise UserError(f"--finetune-last must be a positive integer, got {self.finetune_last!r}")
        if self.lr is not None and (isinstance(self.lr, bool) or not isinstance(self.lr, (int, float))
                                    or not math.isfinite(self.lr) or self.lr <= 0):
            raise UserError(f"--lr must be a positive number, got {self.lr!r}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self, name)
            if name == "momentum" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise UserError(f"--{name.replace('_', '-')} must be a number >= 0, got {value!r}")
        self._check_memory_levers()
        self._check_jactus()
        if self.step_in_backward is not None and not isinstance(self.step_in_backward, bool):
            raise UserError(f"step_in_backward must be true, false or null (where it can run), got {self.step_in_backward!r}")
        if self.momentum is not None and self.momentum and self.optimizer != "sgd":
            raise UserError("--momentum applies to --optimizer sgd only")
        if self.activation_budget is not None:
            from wasi_compress.units import parse_bytes

            parse_bytes(self.activation_budget, "--activation-budget")  # raises UserError on bad input
            if self.method == "vanilla":
                raise UserError("--activation-budget needs --method wasi or asi: vanilla keeps exact activations")
        if self.epochs == 0 and self.output:
            raise UserError("--epochs 0 trains nothing, so -o would write an untrained checkpoint; give --epochs 1 or "
                            "more, or drop -o to only measure")
        if self.resume and not self.output:
            raise UserError("--resume needs -o OUT: the resume state lives next to it (OUT.resume.pt)")
        if self.output and Path(self.output).suffix.lower() != ".safetensors":
            raise UserError(f"-o {self.output}: the checkpoint must have the .safetensors suffix")
        self._check_paths()
        thresholds = tuple(float(t) for t in self.calibration_thresholds)
        if not thresholds or any(not 0.0 < t <= 1.0 for t in thresholds):
            raise UserError(f"calibration thresholds must be in (0, 1], got {list(self.calibration_thresholds)}")
        self.calibration_thresholds = thresholds

    def _check_model_and_data(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise UserError("MODEL is empty")
        if not isinstance(self.data, str) or not self.data.strip():
            raise UserError("--data is empty: give mnist, digits or an image folder (images), or text:FILE or "
                            "stdlib-docs (text)")
        if self.seq_len is not None and (isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int)
                                         or self.seq_len < 1):
            raise UserError(f"--seq-len must be an integer >= 1, got {self.seq_len!r}")

    def _check_jactus(self) -> None:
        if isinstance(self.calib_batches, bool) or not isinstance(self.calib_batches, int) or self.calib_batches < 1:
            raise UserError(f"--calib-batches must be an integer >= 1, got {self.calib_batches!r}")
        if self.method != "jactus":
            for name in ("retain", "budget"):
                if getattr(self, name) is not None:
                    raise UserError(f"--{name} applies to --method jactus only (this run is --method {self.method}); "
                                    f"drop --{name} or add --method jactus")
            return
        self.jactus_config()  # validates --retain / --budget: one line each
        clash = [flag for flag, on in (("--activation-budget", self.activation_budget is not None),
                                       ("--memory-budget", self.memory_budget is not None),
                                       ("--finetune-last", self.finetune_last is not None)) if on]
        if clash:
            raise UserError(f"{', '.join(clash)} cannot be combined with --method jactus (it keeps exact activations "
                            "and compresses every block); drop it")

    def jactus_config(self):
        """The `jactus_` transform's part of these settings (--method jactus)."""
        from wasi_compress.transforms.jactus import JactusConfig

        class FlagNamed(JactusConfig):  # errors name the command's flags: "--retain: ..."
            def label(self, name: str) -> str:
                return "--" + name.replace("_", "-")

        retain = DEFAULT_RETAIN if self.retain is None and self.budget is None else self.retain
        return FlagNamed(retain=retain, budget=self.budget)

    def _check_memory_levers(self) -> None:
        m = self.micro_batches
        if isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= max(self.batch_size, 1):
            raise UserError(f"--micro-batches must be an integer from 1 to --batch-size ({self.batch_size}), got {m!r}")
        if not isinstance(self.recompute, bool):
            raise UserError(f"recompute must be true or false, got {self.recompute!r}")
        if self.frozen_dtype not in ("float32", "bfloat16"):
            raise UserError(f"--frozen-dtype must be float32 or bfloat16, got {self.frozen_dtype!r}")
        if self.frozen_dtype != "float32" and self.finetune_last is None:
            raise UserError("--frozen-dtype bfloat16 stores the parameters --finetune-last freezes, and nothing is "
                            "frozen without it: add --finetune-last N or drop --frozen-dtype")
        if self.memory_budget is not None:
            from wasi_compress.units import parse_bytes

            parse_bytes(self.memory_budget, "--memory-budget")
            if m != 1 or self.recompute or self.activation_budget is not None or self.frozen_dtype != "float32":
                raise UserError("--memory-budget chooses the micro-batches, recomputation, saved-input forms and the "
                                "frozen parameters' dtype itself; drop --micro-batches, --recompute, --activation-budget "
                                "and --frozen-dtype, or drop --memory-budget")
        if m > 1 and self.step_in_backward is True:
            raise UserError("--micro-batches needs the gradients of every chunk before the step, so it cannot run "
                            "with --step-in-backward; drop one of them")
        if m > 1 and self.method == "wasi" and self.update == "subspace-iteration":
            raise UserError("--micro-batches with --update subspace-iteration would update L, R on every chunk, "
                            "not once per batch: use --update optimizer-step")

    @property
    def memory_budget_bytes(self) -> int | None:
        from wasi_compress.units import parse_bytes

        return None if self.memory_budget is None else parse_bytes(self.memory_budget, "--memory-budget")

    def _check_paths(self) -> None:
        """No output may overwrite an input or another output (the resume state is the run's own)."""
        from wasi_compress.hf import model_folder
        from wasi_compress.outputs import check_paths

        from wasi_compress.finetune.text_data import data_files

        inputs = {"MODEL": self.model if Path(self.model).is_file() else None, "--weights": self.weights}
        inputs.update({f"--data {path}": path for path in data_files(self.data)})
        check_paths(inputs, self.output_paths(), data_folders={"--data": self.data, "MODEL": model_folder(self.model)})

    def output_paths(self) -> dict[str, str | Path | None]:
        """Every file the run may write, by the flag that names it (None where not written)."""
        from wasi_compress.outputs import report_html

        return {"-o": self.output, "the resume state": f"{self.output}.resume.pt" if self.output else None,
                "--json": self.json_path, "--report": report_html(self.report_dir)}

    def resolved(self, text_model: bool) -> FinetuneConfig:
        """These settings with the weight threshold decided for the model (when --threshold was not given)."""
        if self.threshold is not None:
            return self
        return dataclasses.replace(self, threshold=TEXT_THRESHOLD if text_model else DEFAULT_THRESHOLD)

    def wasi_config(self) -> WasiConfig:
        """The transform's part of these settings (`prepare_training_`)."""
        threshold = DEFAULT_THRESHOLD if self.threshold is None else self.threshold
        return WasiConfig(method=self.method, update=self.update, threshold=threshold,
                          activation_threshold=self.activation_threshold, activation_budget=self.activation_budget,
                          calibration_thresholds=self.calibration_thresholds, finetune_last=self.finetune_last,
                          lr=self.effective_lr, weight_decay=self.weight_decay, allow_unchanged=self.allow_unchanged)

    @property
    def effective_lr(self) -> float:
        if self.lr is not None:
            return float(self.lr)
        if self.method == "jactus" and self.optimizer == "sgd" and self.effective_momentum:
            return JACTUS_LR
        return DEFAULT_LR["sgd" if self.effective_momentum else "sgd-no-momentum"] if self.optimizer == "sgd" \
            else DEFAULT_LR[self.optimizer]

    @property
    def effective_momentum(self) -> float:
        if self.momentum is not None:
            return float(self.momentum)
        return DEFAULT_MOMENTUM if self.optimizer == "sgd" else 0.0

    @property
    def in_backward(self) -> bool:
        """Whether each optimizer step runs inside backward (step_in_backward, None resolved)."""
        if self.step_in_backward is not None:
            return self.step_in_backward
        import os

        return self.micro_batches == 1 and self.memory_budget is None and int(os.environ.get("WORLD_SIZE", "1")) <= 1

    @property
    def activation_budget_bytes(self) -> int | None:
        from wasi_compress.units import parse_bytes

        return None if self.activation_budget is None else parse_bytes(self.activation_budget, "--activation-budget")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["calibration_thresholds"] = list(self.calibration_thresholds)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FinetuneConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise UserError(f"unknown fine-tuning settings: {', '.join(unknown)}")
        d = dict(d)
        if "calibration_thresholds" in d:
            d["calibration_thresholds"] = tuple(d["calibration_thresholds"])
        return cls(**d)

    @classmethod
    def from_json(cls, text: str) -> FinetuneConfig:
        return cls.from_dict(json.loads(text))
