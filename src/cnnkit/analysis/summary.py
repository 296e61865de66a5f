"""Per-layer summary of any ``nn.Module``: output shape, neurons, parameters, MACs, receptive field
and total stride, the numbers the lecture uses to compare architectures.

    >>> from cnnkit.analysis import summary
    >>> s = summary(model, (3, 224, 224))
    >>> print(s.to_table())

How each number is defined (one image, batch dimension dropped):
- ``neurons``: values in the layer's output. The total counts only layers with weights (conv and
  FC), the lecture's "neurons" (AlexNet: 659,272, "650,000"); pooling outputs are not new units.
- ``params``: the module's parameters (``weights`` excludes biases, as GoogLeNet's Table 1 does).
  The total counts each parameter of the model once.
- ``macs``: multiply-accumulates of convolutions (output values x in_channels/groups x kernel area)
  and FC layers (in x out); biases, pooling, normalisation and activations are not counted, as in
  the papers. ``flops = 2 * macs``. A module can define ``count_macs(input, output) -> int`` to
  supply its own rule.
- ``receptive_field``/``total_stride``: per spatial axis, the input window one output value sees
  and the input distance between neighbouring outputs (the "jump"). A layer with ``kernel_size``
  and ``stride`` (conv, pooling, locally connected, ...) maps (r, j) to (r + (k - 1) d j, j s); an FC
  layer reading a flattened M x M map acts as an M x M kernel; everything else keeps (r, j).
  Values are followed per tensor through every torch operation (``TorchFunctionMode``), so branches
  and concatenations work: a tensor computed from several (``torch.cat`` of inception branches)
  takes the largest receptive field and stride among them. Functional convolutions or poolings
  called outside a module are not seen (treated as elementwise).

Rows come from forward hooks on leaf modules, in execution order; ``collapse`` turns chosen modules
(by class or qualified name) into single rows, e.g. GoogLeNet's inception modules as in Table 1.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from cnnkit.errors import ConfigError

log = logging.getLogger(__name__)

# Shape-preserving modules without weights that the compact table leaves out (activations, reshapes).
ELEMENTWISE = ("ReLU", "ReLU6", "ScaledTanh", "LeakyReLU", "ELU", "GELU", "SiLU", "Tanh", "Sigmoid", "Softmax",
               "LogSoftmax", "Hardtanh", "Softplus", "Flatten", "Unflatten", "Identity")


# How the table names common layers (closer to the papers' tables than class names).
TYPE_LABELS = {"Conv1d": "conv", "Conv2d": "conv", "Conv3d": "conv", "Linear": "fc",
               "MaxPool1d": "max pool", "MaxPool2d": "max pool", "AvgPool1d": "avg pool",
               "AvgPool2d": "avg pool", "LocalResponseNorm": "LRN", "Dropout": "dropout",
               "BatchNorm2d": "batch norm", "Inception": "inception"}


@dataclass(frozen=True)
class LayerRow:
    name: str  # qualified module name; "#2" appended when a module runs again
    type: str
    kernel: str  # "3x3/1" (kernel/stride) for conv and pooling, "" otherwise
    output_shape: tuple[int, ...]
    neurons: int
    params: int
    weights: int
    macs: int
    receptive_field: tuple[int, ...] | None
    total_stride: tuple[int, ...] | None

    @property
    def flops(self) -> int:
        return 2 * self.macs


@dataclass(frozen=True)
class Reference:
    """A column a paper prints, to show beside the same quantity computed.

    ``printed`` maps row names (the module's name or a suffix of it, e.g. ``"conv1"``) to the
    printed numbers; ``computed`` extracts the quantity from a row (e.g. weights / 1024);
    rows whose relative difference exceeds ``rtol`` are marked as disagreeing.
    """

    title: str
    printed: dict[str, float]
    computed: Callable[[LayerRow], float]
    rtol: float = 0.0


@dataclass(frozen=True)
class Comparison:
    row: str
    printed: float
    computed: float | None  # None when the model has no such row

    @property
    def rel_diff(self) -> float:
        if self.computed is None:
            return math.inf
        return (self.computed - self.printed) / self.printed if self.printed else math.inf

    def agrees(self, rtol: float) -> bool:
        """Within ``rtol``, or equal once ours is rounded to the printed digits (1.024 M vs "1M")."""
        if self.computed is None:
            return False
        digits = len(repr(float(self.printed)).split(".")[1].rstrip("0"))
        return abs(self.rel_diff) <= rtol or round(self.computed, digits) == self.printed


@dataclass
class Summary:
    rows: list[LayerRow]
    input_size: tuple[int, ...]
    total_params: int
    references: list[Reference] = field(default_factory=list)

    @property
    def macs(self) -> int:
        return sum(r.macs for r in self.rows)

    @property
    def flops(self) -> int:
        return 2 * self.macs

    @property
    def neurons(self) -> int:
        return sum(r.neurons for r in self.rows if r.params)

    def row(self, name: str) -> LayerRow:
        """The row of module ``name`` (qualified, or a unique dotted suffix such as ``"fc7"``)."""
        hits = [r for r in self.rows if _matches(r.name, name)]
        if len(hits) != 1:
            found = "no" if not hits else f"{len(hits)}"
            raise ConfigError(f"summary has {found} rows named {name!r}; rows: {', '.join(self.names())}")
        return hits[0]

    def names(self) -> list[str]:
        return [r.name for r in self.rows]

    def compare(self, ref: Reference) -> list[Comparison]:
        """Printed vs computed for each row ``ref`` names, in the summary's row order."""
        out = []
        for key, printed in ref.printed.items():
            hits = [r for r in self.rows if _matches(r.name, key)]
            out.append(Comparison(key, printed, ref.computed(hits[0]) if len(hits) == 1 else None))
        order = {k: i for i, k in enumerate(self.names())}
        return sorted(out, key=lambda c: order.get(self._full(c.row), len(order)))

    def _full(self, key: str) -> str:
        return next((r.name for r in self.rows if _matches(r.name, key)), key)

    def totals(self) -> dict[str, int]:
        return {"params": self.total_params, "macs": self.macs, "flops": self.flops, "neurons": self.neurons}

    # ---- rendering -------------------------------------------------------------------------

    def to_table(self, compact: bool = True) -> str:
        """Aligned text; ``compact`` leaves out activations and reshapes (rows in ``ELEMENTWISE``).

        Each reference adds three columns under its title: the paper's number, ours, and the
        relative difference, marked ``!`` where they disagree.
        """
        rows = [r for r in self.rows if not (compact and r.type in ELEMENTWISE)]
        short = _short_names([r.name for r in self.rows])
        head = ["layer", "type", "kernel", "output", "neurons", "params", "MACs", "RF", "stride"]
        body = [[short[r.name], TYPE_LABELS.get(r.type, r.type), r.kernel, _shape(r.output_shape),
                 f"{r.neurons:,}", f"{r.params:,}", f"{r.macs:,}", _axes(r.receptive_field),
                 _axes(r.total_stride)] for r in rows]
        right = {4, 5, 6, 7, 8}
        groups = []
        for ref in self.references:
            groups.append((len(head), 3, ref.title))
            head += ["paper", "ours", "diff"]
            right |= {len(head) - 3, len(head) - 2, len(head) - 1}
            by_row = {self._full(c.row): c for c in self.compare(ref)}
            for r, line in zip(rows, body):
                c = by_row.get(r.name)
                if c is None:
                    line += ["", "", ""]
                    continue
                mark = "" if c.agrees(ref.rtol) else " !"
                diff = "n/a !" if c.computed is None else f"{100 * c.rel_diff + 0.0:+.1f}%{mark}"
                line += [f"{c.printed:,g}", "" if c.computed is None else _num(c.computed), diff]
        t = self.totals()
        lines = [f"input {_shape(self.input_size)}", _align(head, body, right, groups),
                 f"total params {t['params']:,}   MACs {t['macs']:,} ({t['macs'] / 1e9:.3f} G)   "
                 f"FLOPs (2 x MACs) {t['flops'] / 1e9:.3f} G   neurons (conv + FC outputs) {t['neurons']:,}"]
        for ref in self.references:
            bad = [c.row for c in self.compare(ref) if not c.agrees(ref.rtol)]
            rule = f"by more than {100 * ref.rtol:g}% and " if ref.rtol else ""
            where = f": {', '.join(bad)}" if bad else ""
            lines.append(f"{ref.title}: the paper's number differs from ours ({rule}beyond its printed "
                         f"digits) in {len(bad)} of {len(ref.printed)} rows{where}")
        return "\n".join(lines) + "\n"

    def records(self) -> list[dict]:
        recs = []
        comps = [{self._full(c.row): c for c in self.compare(ref)} for ref in self.references]
        for r in self.rows:
            rec = asdict(r)
            rec["flops"] = r.flops
            for ref, by_row in zip(self.references, comps):
                c = by_row.get(r.name)
                rec[f"{ref.title} (paper)"] = None if c is None else c.printed
                rec[ref.title] = None if c is None else c.computed
            recs.append(rec)
        return recs

    def to_csv(self) -> str:
        recs = self.records()
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(recs[0]) if recs else ["name"], lineterminator="\n")
        writer.writeheader()
        for rec in recs:
            writer.writerow({k: "x".join(map(str, v)) if isinstance(v, tuple) else v for k, v in rec.items()})
        return buf.getvalue()

    def to_json(self) -> str:
        doc = {"input_size": list(self.input_size), "rows": self.records(), "totals": self.totals()}
        return json.dumps(doc, indent=2) + "\n"


# ---- computing the rows ----------------------------------------------------------------------


@dataclass(frozen=True)
class _Geo:
    rf: tuple[int, ...]
    jump: tuple[int, ...]
    grid: tuple[int, ...]  # spatial size of the map the values lie on (kept through a flatten)


class _Tracker(TorchFunctionMode):
    """Carries (receptive field, jump) from every tensor to the tensors computed from it."""

    def __init__(self):
        super().__init__()
        self.geo: dict[int, _Geo] = {}
        self._alive: list[torch.Tensor] = []  # keep tensors alive so that their ids stay unique

    def set(self, t: torch.Tensor, g: _Geo) -> None:
        self.geo[id(t)] = g
        self._alive.append(t)

    def get(self, t) -> _Geo | None:
        return self.geo.get(id(t)) if isinstance(t, torch.Tensor) else None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = [g for g in map(self.get, _tensors((args, kwargs))) if g is not None]
        if ins:
            name = getattr(func, "__name__", "")
            if (name == "__setitem__" or name.endswith("_")) and args and isinstance(args[0], torch.Tensor):
                self.set(args[0], _merge(ins, args[0]))  # written in place: a buffer filled from branches
            for t in _tensors(out):
                if id(t) not in self.geo:
                    self.set(t, _merge(ins, t))
        return out


def _tensors(tree) -> list[torch.Tensor]:
    """The tensors in nested tuples, lists and dicts (a module's inputs, outputs or an op's args)."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        tree = list(tree.values())
    if isinstance(tree, (tuple, list)):
        return [t for item in tree for t in _tensors(item)]
    return []


def _merge(ins: list[_Geo], t: torch.Tensor) -> _Geo:
    nd = len(ins[0].rf)
    same = [g for g in ins if len(g.rf) == nd]
    rf = tuple(max(g.rf[i] for g in same) for i in range(nd))
    jump = tuple(max(g.jump[i] for g in same) for i in range(nd))
    grid = tuple(t.shape[2:]) if t.dim() - 2 == nd else ins[0].grid
    return _Geo(rf, jump, grid)


def _tuple(v, nd: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * nd


def _window(m: nn.Module, g: _Geo, x: torch.Tensor, y: torch.Tensor) -> tuple[tuple, tuple]:
    """(kernel, stride, dilation) per axis of a sliding-window module, adaptive pooling included."""
    nd = len(g.rf)
    if "Adaptive" in type(m).__name__:
        # window of adaptive pooling: ceil(in / out) wide, floor(in / out) apart
        n_in, n_out = x.shape[-nd:], y.shape[-nd:]
        k = tuple(-(-i // o) for i, o in zip(n_in, n_out))
        return k, tuple(i // o for i, o in zip(n_in, n_out)), (1,) * nd
    k = _tuple(m.kernel_size, nd)
    s = _tuple(m.stride if m.stride is not None else m.kernel_size, nd)
    d = _tuple(getattr(m, "dilation", 1), nd)
    return k, s, d


def _geometry(m: nn.Module, g: _Geo | None, x, y) -> _Geo | None:
    if g is None or not isinstance(y, torch.Tensor):
        return g
    nd = len(g.rf)
    grid = tuple(y.shape[2:]) if y.dim() - 2 == nd else g.grid
    if isinstance(m, nn.Linear) and isinstance(x, torch.Tensor) and x.dim() == 2:
        # an FC layer reading a flattened M x M map is an M x M kernel (the lecture's FC->conv)
        rf = tuple(r + (n - 1) * j for r, n, j in zip(g.rf, g.grid, g.jump))
        return _Geo(rf, g.jump, (1,) * nd)
    has_window = hasattr(m, "kernel_size") or "Adaptive" in type(m).__name__
    if has_window and isinstance(x, torch.Tensor) and x.dim() - 2 == nd:
        k, s, d = _window(m, g, x, y)
        if "Transpose" in type(m).__name__:
            return _Geo(g.rf, g.jump, grid)  # upsampling: not a receptive-field growth
        rf = tuple(r + (ki - 1) * di * j for r, ki, di, j in zip(g.rf, k, d, g.jump))
        return _Geo(rf, tuple(j * si for j, si in zip(g.jump, s)), grid)
    return _Geo(g.rf, g.jump, grid)


def _first_tensor(v):
    ts = _tensors(v)
    return ts[0] if ts else None


def _macs(m: nn.Module, x, y) -> int | None:
    """Multiply-accumulates per image; None for a weighted layer without a known rule."""
    if hasattr(m, "count_macs"):
        return int(m.count_macs(x, y))
    if not isinstance(y, torch.Tensor):
        return 0
    per_image = y.numel() // max(y.shape[0], 1) if y.dim() else y.numel()
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return per_image * (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return (x.numel() // x.shape[0]) * (m.out_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.Linear):
        return per_image * m.in_features
    return None if next(m.parameters(recurse=False), None) is not None else 0


def _kernel(m: nn.Module) -> str:
    if not hasattr(m, "kernel_size"):
        return ""
    k = _tuple(m.kernel_size, 2)
    s = _tuple(m.stride if getattr(m, "stride", None) is not None else m.kernel_size, len(k))
    return f"{'x'.join(map(str, k))}/{_axes(s)}"


def _count(m: nn.Module) -> tuple[int, int]:
    params = weights = 0
    for name, p in m.named_parameters():
        params += p.numel()
        if not name.endswith("bias"):
            weights += p.numel()
    return params, weights


def summary(model: nn.Module, input_size: Sequence[int], *, collapse: Iterable[type | str] = (),
            references: Iterable[Reference] = (), device: torch.device | str | None = None,
            dtype: torch.dtype | None = None) -> Summary:
    """Run ``model`` once on a zero image of ``input_size`` (C, H, W) and tabulate every layer.

    The model runs in eval mode (restored afterwards), without gradients, on its own device and
    dtype unless given; a model built on the ``meta`` device is summarised without any compute.
    ``collapse``: module classes or qualified names to report as one row each (a module with
    parameters of its own and children is always one row).
    """
    input_size = tuple(int(v) for v in input_size)
    if len(input_size) < 2 or min(input_size) < 1:
        raise ConfigError(f"input size must be positive (C, H, W), got {input_size}")
    first = next(iter(model.parameters()), None)
    if first is None:
        first = next(iter(model.buffers()), None)
    device = torch.device(device) if device is not None else (first.device if first is not None else "cpu")
    dtype = dtype or (first.dtype if first is not None and first.is_floating_point() else torch.float32)
    rows_of, owner = _plan(model, tuple(collapse))

    tracker = _Tracker()
    rows: list[LayerRow] = []
    pending: dict[str, int] = {}  # MACs of the leaves run so far inside each collapsed module
    inner: dict[str, list[tuple[str, str]]] = {}  # (type, kernel) of the weighted leaves inside
    calls: dict[str, int] = {}
    unknown: set[str] = set()

    def on_forward(name: str, m: nn.Module, inputs, output) -> None:
        x, y = _first_tensor(inputs), _first_tensor(output)
        leaf = _is_leaf(m)
        macs = _macs(m, x, y) if leaf else pending.pop(name, 0)
        if macs is None:
            macs = 0
            if type(m).__name__ not in unknown:
                unknown.add(type(m).__name__)
                log.warning("summary: no MAC rule for %s (counted as 0); give it a method "
                            "count_macs(input, output)", type(m).__name__)
        if leaf and y is not None:
            g = _geometry(m, tracker.get(x), x, y)
            if g is not None:
                tracker.set(y, g)
        if name in owner:  # a layer inside a collapsed module: add to that module's row
            pending[owner[name]] = pending.get(owner[name], 0) + macs
            if leaf and next(m.parameters(recurse=False), None) is not None:
                inner.setdefault(owner[name], []).append((type(m).__name__, _kernel(m)))
            return
        if y is None:
            return
        params, weights = _count(m)
        g = tracker.get(y)
        calls[name] = calls.get(name, 0) + 1
        label = (name or type(m).__name__) + (f"#{calls[name]}" if calls[name] > 1 else "")
        kind, kernel = type(m).__name__, _kernel(m) if leaf else ""
        parts = inner.pop(name, [])
        if type(m) is nn.Sequential and len({t for t, _ in parts}) == 1:
            # a collapsed chain of one kind of layer (GoogLeNet's 1x1 + 3x3 conv2): name it by its layers
            kind, kernel = parts[0][0], " + ".join(k for _, k in parts if k)
        rows.append(LayerRow(label, kind, kernel, tuple(y.shape[1:]), y[0].numel() if y.dim() else 1,
                             params, weights, macs, g.rf if g else None, g.jump if g else None))

    hooked = [(n, m) for n, m in model.named_modules() if n in rows_of or (n in owner and _is_leaf(m))]
    handles = [m.register_forward_hook(lambda mod, i, o, n=n: on_forward(n, mod, i, o)) for n, m in hooked]
    was_training = model.training
    x = torch.zeros(1, *input_size, device=device, dtype=dtype)
    model.eval()
    try:
        with torch.no_grad(), tracker:
            nd = len(input_size) - 1
            tracker.set(x, _Geo((1,) * nd, (1,) * nd, tuple(input_size[1:])))
            model(x)
    except (RuntimeError, NotImplementedError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"model does not run on an input of size {input_size}: {reason}") from None
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    total = sum(p.numel() for p in model.parameters())
    return Summary(rows, input_size, total, list(references))


def _is_leaf(m: nn.Module) -> bool:
    return next(m.children(), None) is None


def _plan(model: nn.Module, collapse: tuple) -> tuple[set[str], dict[str, str]]:
    """Which modules give rows, and for modules inside a collapsed one, which row they add to."""
    kinds = tuple(c for c in collapse if isinstance(c, type))
    names = {c for c in collapse if isinstance(c, str)}
    modules = dict(model.named_modules())
    if names - set(modules):
        raise ConfigError(f"cannot collapse {sorted(names - set(modules))}: no such module in the model")
    rows_of: set[str] = set()
    owner: dict[str, str] = {}
    groups: list[str] = []
    for name, m in modules.items():  # parents come before their children
        group = next((g for g in groups if name.startswith(g + ".") or g == ""), None)
        if group is not None:
            owner[name] = group
        elif _is_leaf(m):
            rows_of.add(name)
        elif isinstance(m, kinds) or name in names or (
                name and next(m.parameters(recurse=False), None) is not None):
            rows_of.add(name)
            groups.append(name)
    return rows_of, owner


# ---- formatting helpers ----------------------------------------------------------------------


def _matches(full: str, key: str) -> bool:
    return full == key or full.endswith("." + key)


def _short_names(names: list[str]) -> dict[str, str]:
    """Shortest dotted suffix of each name that no other name ends with (and not a bare index:
    ``b.0`` rather than ``0`` for the first layer of a Sequential ``b``)."""
    out = {}
    for n in names:
        parts = n.split(".")
        for i in range(len(parts) - 1, -1, -1):
            cand = ".".join(parts[i:])
            bare_index = i > 0 and parts[i].split("#")[0].isdigit()
            if not bare_index and sum(_matches(o, cand) for o in names) == 1:
                out[n] = cand
                break
        else:
            out[n] = n
    return out


def _axes(v, sep: str = "x") -> str:
    if v is None:
        return ""
    return str(v[0]) if len(set(v)) == 1 else sep.join(map(str, v))


def _shape(s: Sequence[int]) -> str:
    return "x".join(map(str, s))


def _num(v: float) -> str:
    if float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:,.1f}" if abs(v) >= 10 else f"{v:.2f}"


def _align(head: list[str], body: list[list[str]], right: set[int],
           groups: Sequence[tuple[int, int, str]] = ()) -> str:
    """Columns padded to their widest cell; ``groups`` (first column, span, title) head a span."""
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body)]
    for first, span, title in groups:  # widen the last column of a group to fit its title
        short = len(title) + 4 - (sum(widths[first:first + span]) + 2 * (span - 1))
        if short > 0:
            widths[first + span - 1] += short

    def fmt(line):
        return "  ".join(str(c).rjust(w) if i in right else str(c).ljust(w)
                         for i, (c, w) in enumerate(zip(line, widths))).rstrip()

    lines = []
    if groups:
        top = ""
        for first, span, title in groups:
            start = sum(widths[:first]) + 2 * first
            width = sum(widths[first:first + span]) + 2 * (span - 1)
            top = top.ljust(start) + f" {title} ".center(width, "-")
        lines.append(top)
    rule = "  ".join("-" * w for w in widths)
    return "\n".join([*lines, fmt(head), rule, *map(fmt, body)])
