"""A self-contained HTML report of analyze, convert and finetune documents, with the plots people look at
before trusting a compressed model: singular-value energy per layer, the chosen ranks, the planner's
budget-versus-error curve, the training-memory breakdown, and loss and accuracy per epoch.

`write_report` writes each plot as a PNG into the folder and embeds the same bytes in report.html as
data URIs, so the HTML can be mailed or attached to a CI run on its own. Figures are drawn on
matplotlib's Agg canvas directly (Figure + FigureCanvasAgg, never pyplot): no display is needed and no
global backend or figure registry is touched, as matplotlib advises for servers.

Figures are labelled measured or derived wherever the report's `sources` says so (docs/schemas.md)."""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from wasi_compress.errors import UserError
from wasi_compress.fileio import atomic_path, write_text_atomic
from wasi_compress.outputs import REPORT_NAME, REPORT_PLOTS
from wasi_compress.reports import ANALYZE_SCHEMA as ANALYZE
from wasi_compress.reports import CONVERT_SCHEMA as CONVERT
from wasi_compress.reports import FINETUNE_SCHEMA as FINETUNE
from wasi_compress.reports import KINDS, kind_of_prose
from wasi_compress.units import format_bytes

_MEMORY_PARTS = (  # stacked bottom to top: what a training step holds
    ("params_bytes", "parameters", "#4c72b0"),
    ("grads_bytes", "gradients", "#55a868"),
    ("optimizer_bytes", "optimizer state", "#c44e52"),
    ("saved_activation_bytes", "saved activations", "#dd8452"),
)
_BLOCK_NAME = re.compile(r"^(?:.*\.)?blocks\.(\d+)\.(.+)$")


@dataclass
class Plot:
    filename: str
    title: str
    caption: str  # HTML
    png: bytes


@dataclass
class Section:
    title: str
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # plots that could not be drawn, and why
    details: str = ""  # extra HTML (per-layer tables)


@dataclass
class Row:
    """One line of the summary table: a key figure and, where the report says, whether it was measured."""

    report: str
    figure: str
    value: str
    source: str = ""  # the prose the report records
    kind: str = ""    # measured, derived or counted: from the report's source_kinds


# ---------------------------------------------------------------------------------------------------
# Small helpers

def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    return buffer.getvalue()


def _byte_axis(values: list[float]) -> tuple[float, str]:
    """(scale, unit) so that the largest value reads as a few units: plots in KB, MB or GB like budgets."""
    top = max((abs(v) for v in values), default=0)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if top >= scale:
            return scale, unit
    return 1.0, "B"


def _count(n: float) -> str:
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {suffix}"
    return f"{n:g}"


def _percent_change(new: float, old: float) -> str:
    return f"{(new - old) / old * 100:+.1f}%" if old else ""


def _source(document: dict, container: dict, key: str, dotted: str) -> tuple[str, str]:
    """(prose, kind) the report records for one figure. The prose: first the `sources` beside the figure
    (as in analyze's train_memory), then a document-level `sources` keyed by dotted path or bare key. The
    kind is data: the `source_kinds` beside the figure or at document level (by dotted path, then bare key);
    only a document written before `source_kinds` existed falls back to the prose's first word. A finetune
    memory figure the sources do not mention is measured: docs/schemas.md says they all are "except where
    `sources` says derived"."""
    text = ""
    for sources, name in ((container.get("sources"), key), (document.get("sources"), dotted),
                          (document.get("sources"), key)):
        if isinstance(sources, dict) and isinstance(sources.get(name), str):
            text = sources[name]
            break
    for kinds, name in ((container.get("source_kinds"), key), (document.get("source_kinds"), dotted),
                        (document.get("source_kinds"), key)):
        if isinstance(kinds, dict) and kinds.get(name) in KINDS:
            return text, kinds[name]
    if text:
        has_kinds = isinstance(document.get("source_kinds"), dict) or isinstance(container.get("source_kinds"), dict)
        return text, "" if has_kinds else kind_of_prose(text)
    if document.get("schema") == FINETUNE and dotted.split(".")[0] in ("memory", "memory_vanilla"):
        return "measured", "measured"
    return "", ""


def _memory_part(memory: dict, key: str) -> float:
    """A memory component in bytes. Optimizer state may be given per optimizer (analyze's train_memory);
    AdamW is the one analyze's total_bytes counts, so it is the one drawn."""
    value = memory.get(key, 0)
    return float(value["adamw"] if isinstance(value, dict) else value or 0)


# ---------------------------------------------------------------------------------------------------
# Plots (each returns a Figure; none touches global state)

def energy_figure(analyze: dict) -> Figure:
    """Cumulative singular-value energy (sum of s_i^2 up to k over the total) against rank k, one panel per
    layer role, with the explained-variance thresholds as dashed lines and each layer's chosen rank dotted
    on its curve: how much rank each kind of layer needs for each threshold."""
    roles: dict[str, list[dict]] = {}
    for layer in analyze["layers"]:
        if layer.get("singular_values"):
            roles.setdefault(layer["role"], []).append(layer)
    thresholds = [float(t) for t in analyze.get("thresholds", [])]
    ncols = min(len(roles), 3)
    nrows = math.ceil(len(roles) / ncols)
    fig = Figure(figsize=(4.2 * ncols, 3.3 * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for ax in axes.flat[len(roles):]:
        ax.set_visible(False)
    for ax, (role, layers) in zip(axes.flat, roles.items()):
        colours = [(0.15 + 0.7 * i / max(len(layers) - 1, 1)) for i in range(len(layers))]
        for layer, shade in zip(layers, colours):
            s = np.asarray(layer["singular_values"], dtype=float)
            energy = np.cumsum(s**2) / max(float(np.sum(s**2)), np.finfo(float).tiny)
            ks = np.arange(1, len(s) + 1)
            colour = colormaps["viridis"](shade)
            ax.plot(ks, energy, color=colour, linewidth=1.3, label=layer["name"])
            for t in thresholds:
                k = layer.get("ranks", {}).get(str(t))
                if k:
                    ax.plot([k], [energy[min(k, len(s)) - 1]], "o", color=colour, markersize=3.5)
        for t in thresholds:
            ax.axhline(t, color="#555555", linestyle="--", linewidth=0.8)
            ax.annotate(f"{t:g}", xy=(1, t), xycoords=("axes fraction", "data"), xytext=(2, 0),
                        textcoords="offset points", va="center", fontsize=7, color="#555555")
        ax.set_title(f"{role} ({len(layers)} layer{'s' if len(layers) != 1 else ''})", fontsize=10)
        ax.set_xlabel("rank k", fontsize=9)
        ax.set_ylabel("cumulative energy", fontsize=9)
        ax.set_ylim(0, 1.03)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
        handles, labels = ax.get_legend_handles_labels()
        if len(layers) > 4:  # first and last only: the shade runs from the first layer (dark) to the last
            handles, labels = [handles[0], handles[-1]], [labels[0], labels[-1]]
        ax.legend(handles, labels, fontsize=7, loc="lower right")
    return fig


def ranks_figure(convert: dict) -> tuple[Figure, list[str]]:
    """The rank chosen per layer. Transformer layers named blocks.N.<role> are drawn as a heatmap of blocks
    by role, where depth trends show at a glance; other names as bars. Returns the layers left out of the
    heatmap (e.g. the head), which the caption names."""
    layers = convert["layers"]
    matched = [(_BLOCK_NAME.match(layer["name"]), layer) for layer in layers]
    blocks = sorted({int(m.group(1)) for m, _ in matched if m})
    if len(blocks) >= 2:
        return _rank_heatmap(matched, blocks), [layer["name"] for m, layer in matched if not m]
    return _rank_bars(layers), []


def _rank_heatmap(matched, blocks: list[int]) -> Figure:
    roles: list[str] = []
    for m, _ in matched:
        if m and m.group(2) not in roles:
            roles.append(m.group(2))
    grid = np.full((len(blocks), len(roles)), np.nan)
    dense = np.zeros_like(grid, dtype=bool)
    present = np.zeros_like(grid, dtype=bool)
    for m, layer in matched:
        if not m:
            continue
        i, j = blocks.index(int(m.group(1))), roles.index(m.group(2))
        present[i, j] = True
        if layer["rank"] is None:
            dense[i, j] = True
        else:
            grid[i, j] = layer["rank"]
    fig = Figure(figsize=(max(5.0, 1.25 * len(roles) + 2.2), max(2.8, 0.42 * len(blocks) + 1.6)), layout="constrained")
    ax = fig.subplots()
    ax.set_facecolor("#dddddd")  # dense and absent cells show through the masked grid
    image = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", aspect="auto")
    finite = grid[np.isfinite(grid)]
    middle = (finite.min() + finite.max()) / 2 if finite.size else 0
    for i in range(len(blocks)):
        for j in range(len(roles)):
            if dense[i, j]:
                ax.text(j, i, "dense", ha="center", va="center", fontsize=8, color="#333333")
            elif not present[i, j]:
                ax.text(j, i, "-", ha="center", va="center", fontsize=8, color="#777777")
            else:
                colour = "white" if grid[i, j] < middle else "black"
                ax.text(j, i, f"{int(grid[i, j])}", ha="center", va="center", fontsize=8, color=colour)
    crowded = len(roles) * max(map(len, roles)) > 48  # long role names would overlap side by side
    ax.set_xticks(range(len(roles)), roles, fontsize=8, rotation=20 if crowded else 0, ha="right" if crowded else "center")
    ax.set_yticks(range(len(blocks)), [f"block {b}" for b in blocks], fontsize=8)
    colorbar = fig.colorbar(image, ax=ax, shrink=0.9)
    colorbar.set_label("rank", fontsize=9)
    colorbar.ax.tick_params(labelsize=8)
    return fig


def _rank_bars(layers: list[dict]) -> Figure:
    names = [layer["name"] for layer in layers]
    ranks = [layer["rank"] or 0 for layer in layers]
    fig = Figure(figsize=(7.5, max(2.4, 0.28 * len(layers) + 1.2)), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(layers))
    ax.barh(y, ranks, color="#4c72b0")
    for yi, layer in zip(y, layers):
        if layer["rank"] is None:
            ax.text(0, yi, " dense", va="center", fontsize=8, color="#333333")
    ax.set_yticks(y, names, fontsize=8)
    ax.invert_yaxis()  # execution order, top to bottom
    ax.set_xlabel("rank", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(axis="x", alpha=0.25)
    return fig


def pareto_figure(convert: dict) -> Figure:
    """The planner's best total error at a sweep of budgets, with the chosen budget, the bytes the plan
    uses and the original size marked: how much error a few more (or fewer) bytes would buy."""
    points = sorted(convert["pareto"], key=lambda p: p["budget_bytes"])
    xs = [p["budget_bytes"] for p in points]
    scale, unit = _byte_axis(xs + [convert["budget_bytes"], convert["original_bytes"]])
    fig = Figure(figsize=(7.5, 3.6), layout="constrained")
    ax = fig.subplots()
    ax.plot([x / scale for x in xs], [p["error"] for p in points], "o-", color="#4c72b0", markersize=4,
            label="best total error (Pareto front)")
    ax.axvline(convert["budget_bytes"] / scale, color="#c44e52", linewidth=1.5,
               label=f"budget {format_bytes(convert['budget_bytes'])}")
    ax.axvline(convert["total_bytes"] / scale, color="#c44e52", linestyle=":", linewidth=1.5,
               label=f"plan uses {format_bytes(convert['total_bytes'])}")
    ax.axvline(convert["original_bytes"] / scale, color="#777777", linestyle="--", linewidth=1,
               label=f"original {format_bytes(convert['original_bytes'])}")
    ax.set_xlabel(f"budget ({unit})", fontsize=9)
    ax.set_ylabel(f"total error ({convert.get('objective', '')} objective)", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8)
    return fig


def memory_figure(bars: list[tuple[str, dict]], document: dict, dotted: list[str]) -> Figure:
    """Training memory of one step as stacked bars (parameters, gradients, optimizer state, saved
    activations), one bar per configuration, with the measured peak marked where the report has one.
    Legend entries say measured or derived when every bar's `sources` agrees."""
    totals = [sum(_memory_part(m, key) for key, _, _ in _MEMORY_PARTS) for _, m in bars]
    peaks = [float(m["peak_bytes"]) for _, m in bars if m.get("peak_bytes") is not None]
    scale, unit = _byte_axis(totals + peaks)
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(bars))
    bottom = np.zeros(len(bars))
    for key, label, colour in _MEMORY_PARTS:
        heights = np.array([_memory_part(m, key) for _, m in bars]) / scale
        kinds = {_source(document, m, key, f"{path}.{key}")[1] for (_, m), path in zip(bars, dotted)}
        if len(kinds) == 1 and "" not in kinds:
            label += f" ({kinds.pop()})"
        ax.bar(x, heights, 0.55, bottom=bottom, color=colour, label=label)
        bottom += heights
    for xi, (_, memory) in zip(x, bars):
        if memory.get("peak_bytes") is not None:
            peak = memory["peak_bytes"] / scale
            ax.plot([xi - 0.36, xi + 0.36], [peak, peak], color="black", linewidth=2)
            ax.annotate(f"peak {format_bytes(memory['peak_bytes'])}", (xi, peak), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=8)
        else:
            ax.annotate(format_bytes(bottom[xi] * scale), (xi, bottom[xi]), xytext=(0, 4),
                        textcoords="offset points", ha="center", fontsize=8)
    ax.set_xticks(x, [label for label, _ in bars], fontsize=9)
    ax.set_ylabel(f"memory ({unit})", fontsize=9)
    ax.set_ylim(0, max(bottom.max(), max(peaks, default=0) / scale) * 1.18)
    ax.tick_params(labelsize=8)
    ax.grid(axis="y", alpha=0.25)
    handles, labels = ax.get_legend_handles_labels()  # top part first, as stacked
    fig.legend(handles[::-1], labels[::-1], fontsize=8, loc="outside right upper")
    return fig


def epochs_figure(finetune: dict) -> Figure:
    """Training loss and held-out accuracy after each epoch, side by side."""
    epochs = finetune["epochs"]
    xs = np.arange(1, len(epochs) + 1)
    loss = [e.get("loss") if e.get("loss") is not None else np.nan for e in epochs]
    accuracy = [e["accuracy"] * 100 if e.get("accuracy") is not None else np.nan for e in epochs]
    fig = Figure(figsize=(8.5, 3.2), layout="constrained")
    left, right = fig.subplots(1, 2)
    left.plot(xs, loss, "o-", color="#c44e52", markersize=4)
    left.set_ylabel("training loss", fontsize=9)
    right.plot(xs, accuracy, "o-", color="#4c72b0", markersize=4)
    right.set_ylabel("accuracy (%)", fontsize=9)
    for ax in (left, right):
        ax.set_xlabel("epoch", fontsize=9)
        ax.set_xticks(xs)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
    return fig


# ---------------------------------------------------------------------------------------------------
# Sections: the figures and summary rows of each document

def _analyze_section(doc: dict, rows: list[Row]) -> Section:
    totals = doc["totals"]
    memory = totals["train_memory"]
    batch = doc.get("batch_size")
    rows += [
        Row("analyze", "model", str(doc["model"])),
        Row("analyze", "parameters", f"{totals['params']:,}"),
        Row("analyze", "weights", format_bytes(totals["weight_bytes"])),
        Row("analyze", f"FLOPs, one forward pass at batch {batch}", _count(totals["flops"])),
        Row("analyze", f"training memory, one AdamW step at batch {batch}", format_bytes(memory["total_bytes"]),
            *_source(doc, memory, "total_bytes", "totals.train_memory.total_bytes")),
        Row("analyze", "saved activations", format_bytes(memory["saved_activation_bytes"]),
            *_source(doc, memory, "saved_activation_bytes", "totals.train_memory.saved_activation_bytes")),
        Row("analyze", "linear layers", f"{len(doc['layers'])} ({totals['linear']['params'] / totals['params']:.0%} "
                                          f"of parameters), {len(doc.get('skipped', []))} skipped"),
    ]
    section = Section(f"Analysis of {doc['model']}")
    if any(layer.get("singular_values") for layer in doc["layers"]):
        thresholds = ", ".join(f"{t:g}" for t in doc.get("thresholds", []))
        section.plots.append(Plot(
            "analyze-energy.png", "Singular-value energy per layer",
            "Cumulative energy (explained variance, the sum of s<sub>i</sub><sup>2</sup> up to rank k over the "
            f"total) of each layer's weight, one panel per role. Dashed lines: the thresholds ({thresholds}); "
            "dots: the smallest rank reaching each threshold. A curve that rises steeply compresses well. "
            "Shade runs from the first layer of a role (dark) to the last (light).",
            _png(energy_figure(doc))))
    else:
        section.notes.append("No singular values in the report: the energy plot is left out.")
    bars = [("whole model", memory), ("linear layers only", totals["linear"]["train_memory"])]
    section.plots.append(Plot(
        "analyze-memory.png", "Training memory of the dense model",
        f"One forward and backward step at batch {batch} with AdamW: the whole model, and the part that belongs "
        "to its linear layers (their weights, gradients, optimizer state and the inputs they save). "
        "The legend says which parts were measured and which derived from tensor sizes.",
        _png(memory_figure(bars, doc, ["totals.train_memory", "totals.linear.train_memory"]))))
    _jactus_plot(doc, section, "analyze")
    section.details = _table(
        f"Per-layer analysis ({len(doc['layers'])} layers)",
        ["layer", "role", "in → out", "params", *(f"rank @{t:g}" for t in doc.get("thresholds", [])), "break-even rank"],
        [[layer["name"], layer["role"], f"{layer['in_features']} → {layer['out_features']}", f"{layer['params']:,}",
          *(str(layer.get("ranks", {}).get(str(t), "")) for t in doc.get("thresholds", [])), str(layer["break_even_rank"])]
         for layer in doc["layers"]])
    if doc.get("skipped"):
        section.details += _table(f"Skipped linears ({len(doc['skipped'])})", ["layer", "reason"],
                                  [[s["name"], s["reason"]] for s in doc["skipped"]])
    return section


def _convert_section(doc: dict, rows: list[Row]) -> Section:
    original, total = doc["original_bytes"], doc["total_bytes"]
    rows += [
        Row("convert", "size", f"{format_bytes(total)} of {format_bytes(original)} ({total / original:.1%}), "
                               f"budget {format_bytes(doc['budget_bytes'])}"),
        Row("convert", "parameters", f"{doc['params']['converted']:,} (was {doc['params']['original']:,}, "
                                     f"{_percent_change(doc['params']['converted'], doc['params']['original'])})"),
        Row("convert", "FLOPs", f"{_count(doc['flops']['converted'])} (was {_count(doc['flops']['original'])}, "
                                f"{_percent_change(doc['flops']['converted'], doc['flops']['original'])})"),
    ]
    if doc.get("accuracy"):
        acc = doc["accuracy"]
        rows.append(Row("convert", f"accuracy on {acc.get('dataset', 'the evaluation set')}",
                        f"{acc['converted']:.2%} (was {acc['original']:.2%})", *_source(doc, acc, "converted", "accuracy.converted")))
    if doc.get("onnx"):
        rows.append(Row("convert", "ONNX export, max abs difference", f"{doc['onnx']['max_abs_diff']:.3g}",
                        *_source(doc, doc["onnx"], "max_abs_diff", "onnx.max_abs_diff")))
    dense = sum(layer["rank"] is None for layer in doc["layers"])
    rows.append(Row("convert", "layers", f"{len(doc['layers']) - dense} factorised, {dense} kept dense "
                                         f"({doc.get('allocator', '')} allocator, {doc.get('objective', '')} objective)"))
    section = Section(f"Conversion of {doc['model']} under {format_bytes(doc['budget_bytes'])}")
    figure, left_out = ranks_figure(doc)
    caption = "The rank the planner chose for each layer; dense layers keep their full weight."
    if left_out:
        caption += f" Layers outside the blocks ({', '.join(left_out)}) are in the per-layer table below."
    section.plots.append(Plot("convert-ranks.png", "Chosen rank per layer", html.escape(caption), _png(figure)))
    if doc.get("pareto"):
        section.plots.append(Plot(
            "convert-pareto.png", "Budget versus error",
            "The planner's best total error at a sweep of budgets (its Pareto front), with the chosen budget, "
            "the bytes the plan actually uses, and the original size.", _png(pareto_figure(doc))))
    else:
        section.notes.append("The report has no Pareto sweep: the budget-versus-error plot is left out.")
    section.details = _table(
        f"Per-layer plan ({len(doc['layers'])} layers)", ["layer", "rank", "bytes", "error"],
        [[layer["name"], "dense" if layer["rank"] is None else str(layer["rank"]), format_bytes(layer["bytes"]),
          f"{layer['error']:.4g}"] for layer in doc["layers"]])
    return section


_JACTUS_RANKS = (("k_w", "k_w (weight)", "#4c72b0"), ("k_i", "k_i (input)", "#dd8452"), ("k_o", "k_o (gradient)", "#55a868"),
                 ("k_left", "Q_L (union, out)", "#c44e52"), ("k_right", "Q_R (union, in)", "#8172b3"))


def jactus_figure(plan: dict) -> Figure:
    """JACTUS ranks by depth, one panel per role: the three truncation ranks and the two union ranks the
    allocation chose (as the paper's Figure 3)."""
    by_role: dict[str, list[tuple[int, dict]]] = {}
    for position, layer in enumerate(plan["layers"]):
        m = _BLOCK_NAME.match(layer["name"])
        by_role.setdefault(layer["role"], []).append((int(m.group(1)) if m else position, layer["chosen"]))
    fig = Figure(figsize=(3.2 * len(by_role) + 1.0, 3.2), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(by_role), sharey=True))
    for ax, (role, points) in zip(axes, by_role.items()):
        depth = [d for d, _ in points]
        for key, label, colour in _JACTUS_RANKS:
            ax.plot(depth, [c[key] for _, c in points], marker="o", ms=3, color=colour, label=label)
        ax.set_title(role, fontsize=9)
        ax.set_xlabel("block", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.25)
    axes[0].set_ylabel("rank", fontsize=9)
    axes[-1].legend(fontsize=7, loc="best")
    return fig


def _jactus_plot(doc: dict, section: Section, prefix: str) -> None:
    plan = doc.get("jactus")
    if not plan:
        return
    allocation = ""
    if plan.get("greedy"):
        allocation = (f" Ranks were allocated by the greedy (captured energy per added parameter; total gain "
                      f"{plan['greedy']['total_gain']:.4f}); the exact DP on the same candidates reached "
                      f"{plan['dp']['total_gain']:.4f}.")
    section.plots.append(Plot(
        f"{prefix}-jactus-ranks.png", "JACTUS ranks per layer and role",
        f"Per block and role: the weight's rank k_w, the input rank k_i, the gradient rank k_o and the union "
        f"bases' widths; {plan['result_params']:,} of {plan['original_params']:,} parameters kept "
        f"({plan['retained']:.1%}).{allocation}", _png(jactus_figure(plan))))


def _finetune_section(doc: dict, rows: list[Row]) -> Section:
    memory, vanilla = doc["memory"], doc.get("memory_vanilla")
    method = f"{doc['method']} (update: {doc.get('update')})" if doc.get("update") else doc["method"]
    rows += [Row("finetune", "method", f"{method} on {doc.get('data', '')}"),
             Row("finetune", "final accuracy", f"{doc['final']['accuracy']:.2%}",
                 *_source(doc, doc["final"], "accuracy", "final.accuracy"))]
    for key, label in (("peak_bytes", "peak training memory"), ("saved_activation_bytes", "saved activations"),
                       ("paper_scope_bytes", "linear weights + activations (paper scope)")):
        if memory.get(key) is None:
            continue
        value = format_bytes(memory[key])
        if vanilla and vanilla.get(key):
            value += f" (vanilla {format_bytes(vanilla[key])}, {_percent_change(memory[key], vanilla[key])})"
        rows.append(Row("finetune", label, value, *_source(doc, memory, key, f"memory.{key}")))
    if doc.get("step_time_median_s") is not None:
        rows.append(Row("finetune", "median step time", f"{doc['step_time_median_s'] * 1000:.1f} ms",
                        *_source(doc, doc, "step_time_median_s", "step_time_median_s")))
    section = Section(f"Fine-tuning of {doc['model']} ({doc['method']})")
    bars = ([("vanilla", vanilla)] if vanilla else []) + [(doc["method"], memory)]
    dotted = (["memory_vanilla"] if vanilla else []) + ["memory"]
    section.plots.append(Plot(
        "finetune-memory.png", "Training memory, vanilla beside compressed",
        "Memory of one training step by part, ordinary fine-tuning beside this run's method; the black line is "
        "the measured peak, which also holds temporary buffers the parts do not count. The legend says which "
        "parts were measured and which derived.",
        _png(memory_figure(bars, doc, dotted))))
    _jactus_plot(doc, section, "finetune")
    if doc.get("epochs"):
        section.plots.append(Plot("finetune-epochs.png", "Loss and accuracy per epoch",
                                  "Training loss and held-out accuracy after each epoch.", _png(epochs_figure(doc))))
    else:
        section.notes.append("The report has no epochs: the loss and accuracy plot is left out.")
    return section


# ---------------------------------------------------------------------------------------------------
# HTML

def _table(title: str, header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in body)
    return (f"<details><summary>{html.escape(title)}</summary>"
            f"<table class='layers'><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table></details>")


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1100px;
       padding: 1.5rem 2rem 4rem; color: #222; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { font-size: 1.25rem; margin-top: 2.5rem;
     border-bottom: 1px solid #ddd; padding-bottom: .3rem; } h3 { font-size: 1.02rem; margin: 1.6rem 0 .4rem; }
p.lead, p.note, figcaption { color: #555; font-size: .92rem; }
table { border-collapse: collapse; font-size: .9rem; margin: .6rem 0; }
th, td { text-align: left; padding: .3rem .7rem; border-bottom: 1px solid #e5e5e5; vertical-align: top; }
th { background: #f4f4f4; } table.summary td:first-child { color: #666; white-space: nowrap; }
.source { font-size: .78rem; padding: .08rem .45rem; border-radius: .7rem; white-space: nowrap; }
.source.measured { background: #dff0d8; color: #2f5f20; } .source.derived { background: #fcf1d6; color: #7a5500; }
.source.counted { background: #e3ecf7; color: #24466e; } .source.other { background: #eee; color: #444; }
figure { margin: 1rem 0 1.8rem; } figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
details { margin: .8rem 0; } summary { cursor: pointer; color: #335; }
table.layers td, table.layers th { padding: .2rem .6rem; font-size: .82rem; }
"""


def _source_badge(text: str, kind: str) -> str:
    if not text:
        return ""
    kind = kind or "other"
    return f"<span class='source {kind}' title='{html.escape(text, quote=True)}'>{html.escape(text)}</span>"


def _html(sections: list[Section], rows: list[Row]) -> str:
    summary = "".join(
        f"<tr><td>{html.escape(r.report)}</td><td>{html.escape(r.figure)}</td><td>{html.escape(r.value)}</td>"
        f"<td>{_source_badge(r.source, r.kind)}</td></tr>" for r in rows)
    parts = [
        "<!DOCTYPE html>", "<html lang='en'><head><meta charset='utf-8'>",
        "<meta name='viewport' content='width=device-width, initial-scale=1'>",
        "<title>wasi-compress report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>wasi-compress report</h1>",
        "<h2>Summary</h2>",
        "<table class='summary'><thead><tr><th>report</th><th>figure</th><th>value</th><th>source</th></tr></thead>"
        f"<tbody>{summary}</tbody></table>",
        "<p class='note'>Source, where the report records one: <span class='source measured'>measured</span> "
        "from a real run, or <span class='source derived'>derived</span> from tensor sizes by a stated formula. "
        "Blank: the report does not say.</p>",
    ]
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        for plot in section.plots:
            data = base64.b64encode(plot.png).decode("ascii")
            parts.append(f"<figure><h3>{html.escape(plot.title)}</h3>"
                         f"<img src='data:image/png;base64,{data}' alt='{html.escape(plot.title, quote=True)}' "
                         f"data-file='{html.escape(plot.filename, quote=True)}'>"
                         f"<figcaption>{plot.caption}</figcaption></figure>")
        parts += [f"<p class='note'>{html.escape(note)}</p>" for note in section.notes]
        parts.append(section.details)
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_report(directory: str | Path, *, analyze: dict | None = None, convert: dict | None = None,
                 finetune: dict | None = None) -> Path:
    """Write report.html and its PNGs into `directory` and return the path of report.html.

    Only the documents given get a section. Every file is written atomically, report.html last, so a
    report.html on disk always has its images. Raises UserError when no document is given or one is not
    the kind its argument names."""
    documents = [(doc, schema, name) for doc, schema, name in
                 ((analyze, ANALYZE, "analyze"), (convert, CONVERT, "convert"), (finetune, FINETUNE, "finetune"))
                 if doc is not None]
    if not documents:
        raise UserError("write_report needs at least one of analyze, convert, finetune")
    for doc, schema, name in documents:
        if not isinstance(doc, dict) or doc.get("schema") != schema:
            found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
            raise UserError(f"report: {name}= expects a {schema} document, got {found!r}")
    rows: list[Row] = []
    builders = {"analyze": _analyze_section, "convert": _convert_section, "finetune": _finetune_section}
    sections = [builders[name](doc, rows) for doc, _, name in documents]
    directory = Path(directory)
    for section in sections:
        for plot in section.plots:
            # outputs.REPORT_PLOTS lists what a report folder may hold: the overwrite checks rely on it
            assert plot.filename in REPORT_PLOTS, plot.filename
            with atomic_path(directory / plot.filename) as tmp:
                tmp.write_bytes(plot.png)
    target = directory / REPORT_NAME
    write_text_atomic(target, _html(sections, rows))
    return target
