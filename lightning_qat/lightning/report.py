"""The QAT report: what quantization cost and bought, as a dataclass and its json / markdown / terminal renderings."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning_qat.files import write_text_atomic
from lightning_qat.quantization.sensitivity import worst

ROWS = ("float", "ptq", "qat", "int8", "int8-onnx")
WORST = 10  # layers of lowest SQNR the terminal notes name
MonitorMode = Literal["max", "min"]
# who kept a layer float: skip=, the engine's kernels / shapes, the timing at setup, the budget
KeptBy = Literal["you", "engine", "speed", "budget"]


def kept(name: str, why: str, by: KeptBy) -> dict[str, str]:
    """One entry of :attr:`QATReport.kept_float`."""
    return {"name": name, "why": why, "by": by}


# How far the ONNX artifact's metric may be from the int8 model's, relative, before the report says they disagree: the
# runtimes round differently (measured: 1.3% on timm mobilenetv2_100 on digits, val_acc 0.848 against 0.859).
DISAGREE = 0.05

# Below this share of zero int8 weights the report says nothing of sparsity: rounding alone zeroes ~1% of a dense
# network's weights (a weight under half a quantization step).
SPARSE = 0.05


@dataclass
class QATReport:
    """Metrics, size and latency of the float, (PTQ,) QAT and int8 networks, and how the int8 one was made."""

    backend: str
    mode: str
    num_fused: int
    quantized_layers: int
    stage: str | None = None
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    size_bytes: dict[str, int] = field(default_factory=dict)
    latency_ms: dict[str, float] = field(default_factory=dict)
    latency_batch_size: int = 0
    latency_threads: int = 0
    latency_runtime: dict[str, str] = field(default_factory=dict)
    artifact: str | None = None
    onnx_artifact: str | None = None
    seconds: float = 0.0
    converted_from: str = "last"
    untrained_float: bool = False
    status: str = "complete"
    float_params: dict[str, int] = field(default_factory=dict)
    float_ops: dict[str, int] = field(default_factory=dict)  # parameter-free ops run in float (FX), by name
    network_params: int = 0
    conv_bn_pairs: int | None = None  # convolutions followed by a BatchNorm (None: not counted, eager mode)
    conv_bn_unfused: list[str] = field(default_factory=list)  # "conv -> bn: why" for each pair left unfused
    # every layer or op that stays float, one entry each ({"name", "why", "by"}: see kept()): what skip= asked
    # ("you"), what the engine decided for this CPU's kernels or the network's shape ("engine"), the layers slower in
    # int8 when timed at setup ("speed"), what the accuracy budget search chose ("budget")
    kept_float: list[dict[str, str]] = field(default_factory=list)
    module: str = ""  # the LightningModule's submodule that was quantized: what the artifact computes
    outside_params: int = 0  # parameters of the LightningModule outside ``module``: not in the artifact
    activations: str = "static"  # int8 activations: "static" (calibrated scales) or "dynamic" (per batch, Linears)
    activation_ms: dict[str, float] = field(default_factory=dict)  # the two candidates timed: "static"/"dynamic" -> ms
    # the example timed at setup: "float", "int8" and, when layers were tried float for speed, "kept" -> ms
    speed_ms: dict[str, float] = field(default_factory=dict)
    attention: int = 0  # nn.MultiheadAttention modules whose projections were quantized
    monitor: str | None = None  # the metric the accuracy guard and the fallback search compare
    layer_sqnr: dict[str, float] = field(default_factory=dict)  # quantized layer -> SQNR (dB) vs its float computation
    quantizer_sqnr: dict[str, float] = field(default_factory=dict)  # an activation quantizer after ops (by those ops)
    fallback: list[str] = field(default_factory=list)  # modules / ops the accuracy-budget search kept float
    fallback_met: bool | None = None  # whether a search ran (not None) and met the budget
    fallback_evaluations: int = 0  # int8 models the search evaluated
    fallback_seconds: float = 0.0
    # when int8 is slower than float: each int8 layer and its float twin timed alone, name -> [int8 ms, float ms]
    layer_ms: dict[str, list[float]] = field(default_factory=dict)
    fallback_candidates: list[dict[str, Any]] = field(default_factory=list)  # each: layers, metric, meets, size...
    int8_kernels: int | None = None  # int8 conv/linear kernel calls in the PT2E engine's compiled package
    package_shapes: str | None = None  # the input shapes the compiled package takes ("any": any size), and why not
    # the .pte's operators: "xnnpack" inside the XNNPACK delegate, "layout" reshapes outside it, then each other
    # operator run by ExecuTorch's portable (float) kernels, by name
    delegated: dict[str, int] = field(default_factory=dict)
    # layers the .pte runs in float, inside the delegate: XNNPACK's int32 bias would miss theirs (export.pt2e_graph)
    float_bias: list[str] = field(default_factory=list)
    freezing: dict[str, str] = field(default_factory=dict)  # "bn" / "observers" -> where the fit froze them
    zero_weights: float | None = None  # share of the int8 weights that are exactly zero (sparsity, e.g. pruning)

    def delegation(self) -> str:
        """What of the ``.pte`` runs in the XNNPACK delegate, and what in ExecuTorch's portable kernels."""
        inside, layout = self.delegated.get("xnnpack", 0), self.delegated.get("layout", 0)
        outside = {name: n for name, n in self.delegated.items() if name not in ("xnnpack", "layout")}
        total = inside + sum(outside.values())
        line = f"XNNPACK delegate: {inside} of {total} operators ({inside / max(total, 1):.0%})"
        if outside:
            line += f"; in ExecuTorch's portable float kernels: {', '.join(f'{k} x{n}' for k, n in outside.items())}"
        if self.float_bias:  # say why these run in float
            line += f"; in float inside it (XNNPACK's int32 bias would miss theirs): {', '.join(self.float_bias)}"
        return line + (f"; {layout} reshapes outside it (no arithmetic)" if layout else "")

    def fusion(self) -> str | None:
        """How many Conv-BN pairs were fused, and which were not and why; ``None`` when not counted."""
        if self.conv_bn_pairs is None:
            return None
        fused = self.conv_bn_pairs - len(self.conv_bn_unfused)
        line = f"Conv-BN pairs fused: {fused} of {self.conv_bn_pairs}"
        if self.conv_bn_unfused:
            shown = "; ".join(self.conv_bn_unfused[:5]) + ("; ..." if len(self.conv_bn_unfused) > 5 else "")
            line += f" (each unfused BatchNorm runs in float between a dequantize and a quantize: {shown})"
        return line

    @property
    def size_ratio(self) -> float | None:
        """Float size / int8 size."""
        return _ratio(self.size_bytes)

    @property
    def speedup(self) -> float | None:
        """Float latency / int8 latency: the TorchScript artifact as loaded (same batch, same threads)."""
        return _ratio(self.latency_ms)

    @property
    def onnx_speedup(self) -> float | None:
        """Float latency / latency of the ONNX artifact in ONNX Runtime (same batch, same threads).

        ``None`` when the artifact does not compute what the int8 model does (:meth:`onnx_disagrees`).
        """
        return None if self.onnx_disagrees() else _ratio(self.latency_ms, "int8-onnx")

    def onnx_disagrees(self) -> str | None:
        """The metric on which the ONNX artifact and the int8 model differ by more than :data:`DISAGREE`, said.

        The monitor's, else the most different metric both rows have; ``None`` when they agree.
        """
        onnx, int8 = self.metrics.get("int8-onnx", {}), self.metrics.get("int8", {})
        names = [self.monitor] if self.monitor in onnx and self.monitor in int8 else sorted(set(onnx) & set(int8))

        def apart(name: str) -> float:
            return abs(onnx[name] - int8[name]) / max(abs(int8[name]), 1e-12)

        name = max(names, key=apart, default=None)
        if name is None or not apart(name) > DISAGREE:
            return None
        return f"{name} {onnx[name]:.4g} in ONNX Runtime against {int8[name]:.4g} for the int8 model"

    def where_time_goes(self) -> str:
        """What :attr:`layer_ms` says: the int8 layers slower than their float twins, and the time outside layers."""
        slower = sorted(
            (name for name, (int8, twin) in self.layer_ms.items() if int8 > twin),
            key=lambda name: self.layer_ms[name][1] - self.layer_ms[name][0],
        )
        line = (
            f"where the int8 time goes: {len(slower)} of {len(self.layer_ms)} int8 layers are slower than float alone"
        )
        if slower:
            shown = [f"{name} {self.layer_ms[name][0]:.3f} vs {self.layer_ms[name][1]:.3f} ms" for name in slower[:5]]
            line += f" ({', '.join(shown)}{', ...' if len(slower) > 5 else ''}; skip= keeps them float)"
        total = self.latency_ms.get("int8")
        if total:
            line += (
                f"; the int8 layers take {sum(int8 for int8, _ in self.layer_ms.values()):.3f} of its {total:.3f} ms"
            )
            line += ", the rest is the runtime and the conversions"
            if self.float_ops:
                line += f" around {sum(self.float_ops.values())} float ops (each between a dequantize and a quantize)"
        return line

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict, ratios included."""
        return {
            **asdict(self),
            "size_ratio": self.size_ratio,
            "speedup": self.speedup,
            "onnx_speedup": self.onnx_speedup,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> QATReport:
        """Inverse of :meth:`to_dict`."""
        names = set(cls.__dataclass_fields__)
        values = {k: v for k, v in data.items() if k in names}
        if isinstance(values.get("kept_float"), dict):  # a report written before the one list: name -> why
            values["kept_float"] = [kept(name, why, "engine") for name, why in values["kept_float"].items()]
        return cls(**values)

    def metric_names(self) -> list[str]:
        """Every metric name of any row, sorted."""
        return sorted({name for row in self.metrics.values() for name in row})

    def metric_drop(self, monitor: str, mode: MonitorMode) -> float | None:
        """How much worse int8 is than float on ``monitor`` (positive = worse); ``None`` if either was not logged."""
        float_value = self.metrics.get("float", {}).get(monitor)
        int8_value = self.metrics.get("int8", {}).get(monitor)
        if float_value is None or int8_value is None:
            return None
        return drop(float_value, int8_value, mode)

    def table(self) -> tuple[list[str], list[list[str]]]:
        """The one table every rendering shows: a column per network, a row per metric, then size and latency."""
        columns = [r for r in ROWS if r in self.metrics or r in self.size_bytes or r in self.latency_ms]
        rows = [[name, *(_fmt(self.metrics.get(c, {}).get(name)) for c in columns)] for name in self.metric_names()]
        if self.size_bytes:
            rows.append(["size (MB)", *(_mb(self.size_bytes.get(c)) for c in columns)])
        if self.latency_ms:
            label = f"latency (ms / batch of {self.latency_batch_size}, {_threads(self.latency_threads)})"
            rows.append([label, *(_fmt(self.latency_ms.get(c)) for c in columns)])
        if self.latency_runtime:
            rows.append(["timed as", *(self.latency_runtime.get(c, "-") for c in columns)])
        return ["", *columns], rows

    def headline(self) -> str:
        """How the int8 model was made, in one line (the status first while it is not complete)."""
        status = "" if self.status == "complete" else f"[{self.status}] "
        return status + (
            f"backend {self.backend}, {self.mode} engine, {self.num_fused} fused modules, "
            f"{self.quantized_layers} quantized layers, kept float: "
            f"{', '.join(entry['name'] for entry in self.kept_float) or 'nothing'}"
        )

    def summary(self) -> list[str]:
        """The ratios and where the artifact is, one sentence each."""
        lines = []
        disagrees = self.onnx_disagrees()
        if disagrees:
            lines.append(
                f"INT8-ONNX DISAGREES WITH INT8: {disagrees}: ONNX Runtime computes another function from this file; "
                "deploy the TorchScript artifact (and please report the network to lightning-qat)"
            )
        fastest = max((s for s in (self.speedup, self.onnx_speedup) if s is not None), default=None)
        if fastest is not None and fastest < 1:
            lines.append(
                f"SLOWER THAN FLOAT: the int8 artifact runs at {fastest:.2f}x the float speed on this input: try "
                "another backend or runtime (export=['torchscript', 'onnx']), skip= the layers around float-only ops, "
                "or keep the float model"
            )
        elif self.speedup is not None and self.speedup < 1:
            lines.append(
                f"SLOWER THAN FLOAT in TorchScript: {self.speedup:.2f}x the float speed on this input; the ONNX "
                f"artifact in ONNX Runtime runs at {self.onnx_speedup:.2f}x: deploy that one"
            )
        if self.speed_ms:
            lines.append(timed_at_setup(self.speed_ms, sum(entry["by"] == "speed" for entry in self.kept_float)))
        if self.layer_ms:
            lines.append(self.where_time_goes())
        fusion = self.fusion()
        if fusion and 2 * len(self.conv_bn_unfused) > (self.conv_bn_pairs or 0):
            lines.append(f"MOST BATCHNORMS UNFUSED: {fusion}")
        elif fusion:
            lines.append(fusion)
        speed = [f"{entry['name']} ({entry['why']})" for entry in self.kept_float if entry["by"] == "speed"]
        if speed:  # each with its own times: one line
            shown = ", ".join(speed[:5]) + (f", ... ({len(speed)} in all)" if len(speed) > 5 else "")
            lines.append(f"kept float (for speed, each alone at the example's shape, timed at setup): {shown}")
        for by, why in dict.fromkeys((e["by"], e["why"]) for e in self.kept_float if e["by"] != "speed"):
            names = [entry["name"] for entry in self.kept_float if (entry["by"], entry["why"]) == (by, why)]
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            lines.append(f"kept float ({_BY[by]}): {shown}: {why}")
        if self.quantized_layers == 0:
            lines.append("nothing was quantized: the int8 model is the float network between quantize and dequantize")
        if self.float_params and self.network_params:
            kept = sum(self.float_params.values())
            parts = ", ".join(f"{name} {count:,}" for name, count in self.float_params.items())
            lines.append(f"kept in float: {kept / self.network_params:.1%} of the parameters ({parts})")
        if self.float_ops:
            parts = ", ".join(f"{name} {count}" for name, count in self.float_ops.items())
            lines.append(
                f"run in float between int8 layers (torch has no int8 kernel for them; each costs a dequantize and a "
                f"quantize): {parts}"
            )
        if self.attention:
            lines.append(
                f"attention: the in- and out-projections of {self.attention} nn.MultiheadAttention modules are int8 "
                "Linears; the softmax attention between them runs in float"
            )
        if self.activations == "dynamic":
            lines.append(
                "activations: dynamic int8 (Linears quantize their input per batch at run time; the other layers run "
                f"in float){_timed(self.activation_ms, 'dynamic', 'static')}"
            )
        elif self.activation_ms:
            lines.append(f"activations: static int8{_timed(self.activation_ms, 'static', 'dynamic')}")
        if self.layer_sqnr:
            lowest = worst(self.layer_sqnr, WORST)
            shown = ", ".join(f"{name} {db:.1f}" for name, db in lowest)
            lines.append(
                f"per-layer SQNR (dB, int8 vs float computation; 40 dB = 1% error), the {len(lowest)} lowest of "
                f"{len(self.layer_sqnr)}: {shown}"
            )
        if self.fallback_met is not None:
            searched = f"{self.fallback_evaluations} int8 models evaluated in {self.fallback_seconds:.1f} s"
            floating = ", ".join(self.fallback) or "nothing"
            if self.fallback_met:
                lines.append(f"accuracy budget met by keeping float: {floating} (search: {searched})")
            else:
                lines.append(f"ACCURACY BUDGET NOT MET by any fallback tried ({searched}); kept float: {floating}")
        if self.zero_weights is not None and self.zero_weights >= SPARSE:
            lines.append(f"sparsity: {self.zero_weights:.1%} of the int8 weights are zero (pruned weights stay zero)")
        if self.freezing:
            said = [
                f"{label} at {self.freezing[key]}" if key in self.freezing else f"{label} never"
                for key, label in (("bn", "BatchNorm statistics"), ("observers", "observers"))
            ]
            lines.append(f"frozen in the fit: {'; '.join(said)}")
        if self.untrained_float:
            lines.append("the float row is the untrained network QAT started from: not a baseline to compare with")
        if self.converted_from != "last":
            lines.append(f"int8 converted from the {self.converted_from}")
        if self.size_ratio and self.size_ratio >= 1:
            lines.append(f"int8 is {self.size_ratio:.2f}x smaller than float")
        elif self.size_ratio:
            lines.append(f"int8 is {1 / self.size_ratio:.2f}x LARGER than float (the file carries its compiled code)")
        if self.speedup:
            runtime = self.latency_runtime.get("int8", "TorchScript artifact")
            lines.append(
                f"int8 ({runtime}) is {self.speedup:.2f}x faster than float ({_threads(self.latency_threads)})"
            )
        if self.onnx_speedup:
            lines.append(
                f"int8-onnx (ONNX Runtime) is {self.onnx_speedup:.2f}x faster than float "
                f"({_threads(self.latency_threads)})"
            )
        if self.artifact:
            part = (
                f" (`{self.module}` only: {self.outside_params:,} parameters of the LightningModule outside it stay "
                "in your code, in float)"
                if self.outside_params
                else ""
            )
            lines.append(f"int8 artifact: {self.artifact}{part}")
        if self.int8_kernels is not None:
            lines.append(
                f"int8 kernels in the compiled package: {self.int8_kernels} (for {self.quantized_layers} int8 layers)"
            )
        if self.package_shapes is not None:
            lines.append(
                f"the {'program' if self.delegated else 'compiled package'} takes inputs of shapes "
                f"{self.package_shapes}"
            )
        if self.delegated:
            lines.append(self.delegation())
        if self.onnx_artifact:
            lines.append(f"int8 ONNX artifact: {self.onnx_artifact}")
        return lines

    def to_markdown(self) -> str:
        """The report as a markdown document."""
        header, rows = self.table()
        slower = [
            f"**{line}**" for line in self.summary() if line.startswith(("SLOWER", "MOST", "ACCURACY", "INT8-ONNX"))
        ]
        lines = ["# QAT report", "", *slower, *([""] if slower else []), self.headline(), ""]
        if rows:
            lines += ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in rows]
            lines.append("")
        lines += [f"- {line}" for line in self.summary()]
        if self.fallback_candidates:
            lines += ["", "## Fallback candidates", ""]
            lines += ["| when | kept float | metric | meets budget | size (MB) | latency (ms) |", "|---" * 6 + "|"]
            for c in self.fallback_candidates:
                kept = ", ".join(c.get("names") or c["layers"]) or "none"  # every module / op (older reports: layers)
                cells = [c.get("when", ""), kept, _fmt(c["metric"])]
                cells += ["yes" if c["meets"] else "no", _mb(c["size_bytes"]), _fmt(c["latency_ms"])]
                lines.append("| " + " | ".join(cells) + " |")
        if self.layer_sqnr:
            lines += ["", "## Per-layer SQNR", "", "| layer | SQNR (dB) |", "|---|---|"]
            lines += [f"| {name} | {db:.1f} |" for name, db in self.layer_sqnr.items()]
        if self.quantizer_sqnr:
            lines += ["", "## SQNR of the quantizers after ops", "", "| between | SQNR (dB) |", "|---|---|"]
            lines += [f"| {name} | {db:.1f} |" for name, db in self.quantizer_sqnr.items()]
        return "\n".join(lines) + "\n"

    def print(self) -> None:
        """Print the report as a rich table."""
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        # Text, not markup: the report's own brackets ("[[any, 65]]", layer names) are not rich's style tags
        header, rows = self.table()
        table = Table(title=Text(f"QAT report: {self.headline()}"))
        table.add_column(Text(header[0]))
        for name in header[1:]:
            table.add_column(Text(name), justify="right")
        for row in rows:
            table.add_row(*map(Text, row))
        console = Console()
        console.print(table)
        for line in self.summary():
            console.print(Text(line))

    def save(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``qat_report.json`` and ``qat_report.md`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        json_path, md_path = directory / "qat_report.json", directory / "qat_report.md"
        write_text_atomic(json_path, json.dumps(self.to_dict(), indent=2))
        write_text_atomic(md_path, self.to_markdown())
        return json_path, md_path


_BY = {"you": "by you", "engine": "by the engine", "speed": "for speed", "budget": "for the accuracy budget"}


def timed_at_setup(ms: dict[str, float], kept: int) -> str:
    """What ``setup`` timed (:mod:`~lightning_qat.lightning.speed`), ``kept`` layers kept float for speed, in a line."""
    line = f"timed at setup on the example: int8 {ms['int8']:.3g} ms against float {ms['float']:.3g} ms"
    if kept:
        line += f"; {kept} layers slower or barely faster in int8 kept float for speed: int8 then {ms['kept']:.3g} ms"
    elif "kept" in ms:
        line += f"; with the layers slower in int8 kept float it ran {ms['kept']:.3g} ms, too little gain to take"
    if ms["kept" if kept else "int8"] > ms["float"]:
        line += (
            ". int8 does not pay on this network on this CPU: ship the float model, or try another runtime "
            "(export=['onnx'] runs it in ONNX Runtime)"
        )
    return line


def drop(float_value: float, value: float, mode: MonitorMode) -> float:
    """How much worse ``value`` is than ``float_value`` for a metric where ``mode`` is better (positive = worse)."""
    return float_value - value if mode == "max" else value - float_value


def _timed(ms: dict[str, float], chosen: str, other: str) -> str:
    if chosen not in ms or other not in ms:
        return ""
    return f", chosen by timing: {ms[chosen]:.3g} ms against {ms[other]:.3g} ms for {other} on the example input"


def _ratio(values: dict[str, Any], row: str = "int8") -> float | None:
    if values.get(row) and values.get("float"):
        return values["float"] / values[row]
    return None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _mb(value: int | None) -> str:
    return "-" if value is None else f"{value / 1e6:.3f}"


def _threads(n: int) -> str:
    return f"{n} thread" if n == 1 else f"{n} threads"
