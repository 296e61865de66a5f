"""The numbers the lecture prints about the classic architectures, beside what cnnkit computes.

Every computed value comes from the zoo's own models (built on the ``meta`` device: no memory, no
compute) and :func:`cnnkit.analysis.summary`; nothing here is typed in twice. Where the lecture and
the computation disagree the reason is given when it is known, and called a likely explanation when
it is only that.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from cnnkit.analysis.summary import Reference, summary
from cnnkit.lecture.section import Number, Section
from cnnkit.models import create, list_models

MIB = 2**20


def build_meta(name: str, **options) -> nn.Module:
    with torch.device("meta"):
        return create(name, **options)


def meta_summary(name: str, size=None, **options):
    from cnnkit.models import model_info

    model = build_meta(name, **options)
    return model, summary(model, size or model_info(name).input_size)


def n(v) -> str:
    """An integer with thousands separators, a float with up to 4 significant digits."""
    if isinstance(v, int) or float(v).is_integer():
        return f"{int(v):,}"
    return f"{v:.4g}"


def close(printed: float, computed: float, rtol: float) -> bool:
    return abs(computed - printed) <= rtol * abs(printed)


def table(rows: list[Number]) -> str:
    """The section's numbers as a Markdown table (lecture | cnnkit | agrees | note)."""
    mark = {True: "yes", False: "**no**", None: "n/a"}
    lines = ["| what | lecture | cnnkit | agrees | note |", "|---|---|---|---|---|"]
    lines += [f"| {r.what} | {r.lecture} | {r.computed} | {mark[r.agrees]} | {r.note} |" for r in rows]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- layer cells


def layer_cells(model: nn.Module) -> list[dict]:
    """Each conv/FC layer as the lecture's tables describe it: filters, kernel, stride, pad, and what
    follows it before the next weighted layer (LRN, pooling factor = the pool's stride, dropout)."""
    cells: list[dict] = []
    for name, m in model.named_modules():
        if next(m.children(), None) is not None:
            continue
        if isinstance(m, nn.Conv2d):
            cells.append({"name": name.rsplit(".", 1)[-1], "filters": m.out_channels, "kernel": m.kernel_size[0],
                          "stride": m.stride[0], "pad": m.padding[0], "lrn": False, "pool": None,
                          "groups": m.groups})
        elif isinstance(m, nn.Linear):
            cells.append({"name": name.rsplit(".", 1)[-1], "filters": m.out_features, "fc": True,
                          "dropout": False})
        elif cells and type(m).__name__ in ("LocalResponseNorm", "CrossMapLRN", "LRN"):
            cells[-1]["lrn"] = True
        elif cells and isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            s = m.stride if isinstance(m.stride, int) else m.stride[0]
            cells[-1]["pool"] = s
        elif cells and isinstance(m, nn.Dropout) and cells[-1].get("fc"):
            cells[-1]["dropout"] = True
    return cells


CELL = re.compile(r"(\d+)\s*x\s*(\d+)\s*x\s*\d+\s*st\.\s*(\d+)(?:\s*,?\s*pad\s*(\d+))?(\s*,?\s*LRN)?"
                  r"(?:\s*,?\s*x(\d)\s*pool)?")


def parse_cell(text: str) -> dict:
    """'96x7x7 st. 2, pad 0 LRN, x3 pool' -> filters, kernel, stride, pad (None if not printed),
    lrn, pool factor (None if no pooling)."""
    m = CELL.fullmatch(text.strip())
    if not m:
        raise ValueError(f"cannot read the table cell {text!r}")
    return {"filters": int(m[1]), "kernel": int(m[2]), "stride": int(m[3]),
            "pad": None if m[4] is None else int(m[4]), "lrn": bool(m[5]), "pool": None if m[6] is None else int(m[6])}


def cell_text(c: dict) -> str:
    text = f"{c['filters']}x{c['kernel']}x{c['kernel']} st. {c['stride']}, pad {c['pad']}"
    if c["lrn"]:
        text += " LRN"
    if c["pool"]:
        text += f", x{c['pool']} pool"
    return text


def cell_agrees(printed: dict, computed: dict) -> bool:
    keys = ["filters", "kernel", "stride", "lrn", "pool"] + (["pad"] if printed["pad"] is not None else [])
    return all(printed[k] == computed[k] for k in keys)


# --------------------------------------------------------------------------- AlexNet

ALEXNET_NEURONS = {"conv1": 253_440, "conv2": 186_624, "conv3": 64_896, "conv4": 64_896,
                   "conv5": 43_264, "fc6": 4_096, "fc7": 4_096, "fc8": 1_000}


def alexnet_numbers() -> list[Number]:
    model, s = meta_summary("alexnet")
    rows: list[Number] = []
    for layer, printed in ALEXNET_NEURONS.items():
        computed = s.row(layer).neurons
        note = ""
        if computed != printed:
            note = (f"{n(computed)} = {'x'.join(map(str, s.row(layer).output_shape))}; "
                    f"{n(printed)} = 48x55x96, the outputs of one of the two GPUs' halves of 96 maps "
                    "(a likely explanation, not stated in the paper)" if layer == "conv1" else "")
        rows.append(Number(f"AlexNet neurons in {layer}", n(printed), n(computed), computed == printed, note))
    neurons, params, macs = s.neurons, s.total_params, s.macs
    rows.append(Number("AlexNet neurons (conv and FC outputs)", "650000", n(neurons), close(650_000, neurons, 0.02),
                       "the paper says 'about 650,000'; the sum of the lecture's own row is "
                       f"{n(sum(ALEXNET_NEURONS.values()))}"))
    rows.append(Number("AlexNet parameters", "60000000", n(params), close(60e6, params, 0.02),
                       "weights + biases, two-GPU grouping in conv2/4/5, 227x227 input"))
    fc = sum(r.macs for r in s.rows if r.type == "Linear")
    rows.append(Number("AlexNet connections", "63000000", n(macs), False,
                       "the AlexNet paper says 630 million (the lecture drops a zero); cnnkit counts "
                       f"{n(macs)} multiply-adds per image ({n(macs - fc)} in conv, {n(fc)} in FC), "
                       f"{macs / 630e6:.2f}x the paper's figure; the paper does not say how it counted"))
    convs = [c for c in layer_cells(model) if not c.get("fc")]
    fcs = [c for c in layer_cells(model) if c.get("fc")]
    rows.append(Number("AlexNet conv / FC layers for features", "5 conv, 2 FC", f"{len(convs)} conv, {len(fcs) - 1} FC",
                       len(convs) == 5 and len(fcs) - 1 == 2, "the third FC layer is the 1000-way classifier"))
    pooled = [i + 1 for i, c in enumerate(convs) if c["pool"]]
    rows.append(Number("AlexNet conv layers followed by max pooling", "1, 2, 5", ", ".join(map(str, pooled)),
                       pooled == [1, 2, 5]))
    drops = [c["name"] for c in fcs if c["dropout"]]
    rows.append(Number("AlexNet dropout layers", "the two globally-connected hidden layers", ", ".join(drops),
                       len(drops) == 2, "p = 0.5 in both"))
    positions = (256 - 224 + 1) ** 2
    rows.append(Number("AlexNet training set enlarged by crops and reflections", "2048 (paper)",
                       f"{n(positions * 2)}", False,
                       f"cnnkit's crop takes any of the (256 - 224 + 1)^2 = {n(positions)} positions; the paper's "
                       "2048 = 32^2 x 2 counts 32 offsets per axis"))
    return rows


def alexnet(out: Path, *, quick: bool, seed: int, progress=None) -> Section:
    rows = alexnet_numbers()
    text = ("Krizhevsky, Sutskever and Hinton (NIPS 2012). The neuron counts per layer are the outputs of each "
            "conv/FC layer computed by `cnnkit summary alexnet`; parameters and multiply-adds likewise. The "
            "lecture's first neuron count does not add up, and its '63000000 connections' is the paper's 630 "
            "million with a zero dropped; neither is 'fixed' here, both are shown.\n\n" + table(rows))
    return Section("alexnet", "Model architecture - AlexNet (Krizhevsky 2012)", text, numbers=rows,
                   command="cnnkit summary alexnet")


# --------------------------------------------------------------------------- Chatfield et al.

CHATFIELD = {  # the lecture's table, cell by cell
    "cnn_f": ["64x11x11 st. 4, pad 0 LRN, x2 pool", "256x5x5 st. 1, pad 2 LRN, x2 pool", "256x3x3 st. 1, pad 1",
              "256x3x3 st. 1, pad 1", "256x3x3 st. 1, pad 1 x2 pool"],
    "cnn_m": ["96x7x7 st. 2, pad 0 LRN, x2 pool", "256x5x5 st. 2, pad 1 LRN, x2 pool", "512x3x3 st. 1, pad 1",
              "512x3x3 st. 1, pad 1", "512x3x3 st. 1, pad 1 x2 pool"],
    "cnn_s": ["96x7x7 st. 2, pad 0 LRN, x3 pool", "256x5x5 st. 1 pad 1 x2 pool", "512x3x3 st. 1, pad 1",
              "512x3x3 st. 1, pad 1", "512x3x3 st. 1, pad 1 x3 pool"],
}
CLARIFAI = ["96x7x7 st. 2, LRN,x2 pool", "256x5x5 st. 2, pad1 LRN,x2 pool", "384x3x3 st. 1,pad1", "384x3x3 st. 1,pad1"]


def conv_rows(model_name: str, printed_cells: list[str], label: str, notes: dict | None = None) -> list[Number]:
    notes = notes or {}
    cells = [c for c in layer_cells(build_meta(model_name)) if not c.get("fc")]
    rows = []
    for i, text in enumerate(printed_cells):
        printed, computed = parse_cell(text), cells[i]
        note = "" if printed["pad"] is not None else "the lecture prints no padding"
        rows.append(Number(f"{label} conv{i + 1}", text, cell_text(computed), cell_agrees(printed, computed),
                           notes.get(i + 1, note)))
    return rows


def chatfield(out: Path, *, quick: bool, seed: int, progress=None) -> Section:
    rows: list[Number] = []
    for name, cells in CHATFIELD.items():
        rows += conv_rows(name, cells, name.upper().replace("_", "-"))
        fcs = [c for c in layer_cells(build_meta(name)) if c.get("fc")]
        printed = "4096 dropout, 4096 dropout, 1000 softmax"
        computed = ", ".join(f"{c['filters']} {'dropout' if c['dropout'] else 'softmax'}" for c in fcs)
        rows.append(Number(f"{name.upper().replace('_', '-')} full6-8", printed, computed, printed == computed))
    for width in (2048, 1024, 128):
        fc7 = [c for c in layer_cells(build_meta(f"cnn_m_{width}")) if c.get("fc")][1]["filters"]
        rows.append(Number(f"CNN-M-{width} fc7 width", str(width), str(fc7), fc7 == width))
    rows.append(Number("CNN-M-128 feature vs CNN-M", "32x smaller", f"{4096 // 128}x smaller", 4096 // 128 == 32))
    text = ("Chatfield, Simonyan, Vedaldi and Zisserman (BMVC 2014), the lecture's table read cell by cell and "
            "compared with the layers of `cnn_f`, `cnn_m`, `cnn_s` (and the CNN-M fc7 variants). A pooling "
            "factor 'x2 pool' is the pool's stride.\n\n" + table(rows))
    return Section("chatfield", "Investigate components of CNNs (Chatfield et al. BMVC'14)", text, numbers=rows,
                   command="cnnkit summary cnn_s")


def clarifai(out: Path, *, quick: bool, seed: int, progress=None) -> Section:
    rows = conv_rows("zfnet", CLARIFAI, "Clarifai/ZF", {
        2: "Zeiler and Fergus's Fig. 3 maps 55x55 to 26x26 in layer 2, which a 5x5/2 convolution does with pad 0; "
           "pad 1 would give 27x27"})
    a = [c for c in layer_cells(build_meta("alexnet")) if not c.get("fc")][0]
    z = [c for c in layer_cells(build_meta("zfnet")) if not c.get("fc")]
    rows.append(Number("first layer kernel, AlexNet -> Clarifai", "11x11 to 7x7",
                       f"{a['kernel']}x{a['kernel']} to {z[0]['kernel']}x{z[0]['kernel']}",
                       (a["kernel"], z[0]["kernel"]) == (11, 7)))
    rows.append(Number("first layer stride, AlexNet -> Clarifai", "4 to 2", f"{a['stride']} to {z[0]['stride']}",
                       (a["stride"], z[0]["stride"]) == (4, 2)))
    pooled = [i + 1 for i, c in enumerate(z) if c["pool"]]
    rows.append(Number("Clarifai conv layers followed by max pooling", "1, 2, 5", ", ".join(map(str, pooled)),
                       pooled == [1, 2, 5]))
    _, s = meta_summary("zfnet")
    rows.append(Number("Clarifai/ZF parameters", "-", n(s.total_params), None, "the lecture prints none"))
    text = ("Zeiler and Fergus (ECCV 2014), the ILSVRC 2013 winner's architecture, as `zfnet`. The lecture's "
            "Clarifai row leaves out conv5 and garbles the FC cells, so only the printed convolutions are "
            "compared.\n\n" + table(rows))
    return Section("clarifai", "Model architecture - Clarifai", text, numbers=rows, command="cnnkit summary zfnet")


def overfeat(out: Path, *, quick: bool, seed: int, progress=None) -> Section:
    a = [c for c in layer_cells(build_meta("alexnet")) if not c.get("fc")]
    rows: list[Number] = []
    for name in ("overfeat_fast", "overfeat_accurate"):
        o = [c for c in layer_cells(build_meta(name)) if not c.get("fc")]
        fast = name == "overfeat_fast"
        widths = "/".join(str(c["filters"]) for c in o[2:])
        rows.append(Number(f"{name} conv3 filters (AlexNet -> OverFeat)", "384 => 512",
                           f"{a[2]['filters']} => {o[2]['filters']}", (a[2]["filters"], o[2]["filters"]) == (384, 512)))
        rows.append(Number(f"{name} conv4/conv5 filters (AlexNet -> OverFeat)", "384 => 1024",
                           f"{a[3]['filters']}/{a[4]['filters']} => {o[3]['filters']}/{o[4]['filters']}",
                           o[3]["filters"] == 1024 and o[4]["filters"] == 1024 if fast else None,
                           "AlexNet's conv5 has 256 filters, not 384" + ("" if fast else
                           f"; the sentence describes the fast model: the accurate one has conv3-conv{len(o)} of "
                           f"{widths}")))
        _, s = meta_summary(name)
        pools = sum(isinstance(m, nn.MaxPool2d) for m in build_meta(name).modules())
        rows.append(Number(f"{name} parameters / max-pooling layers", "less pooling and more filters",
                           f"{n(s.total_params)} / {pools} (AlexNet 3)", pools <= 3))
    text = ("Sermanet et al. (ICLR 2014): OverFeat's fast and accurate models against AlexNet.\n\n" + table(rows))
    return Section("overfeat", "Model architecture - Overfeat", text, numbers=rows,
                   command="cnnkit summary overfeat_accurate")


# --------------------------------------------------------------------------- VGG, Deep Image, NIN, GoogLeNet

VGG_LAYERS = {"vgg_a": 11, "vgg_a_lrn": 11, "vgg_b": 13, "vgg_c": 16, "vgg_d": 16, "vgg_e": 19}
VGG_PARAMS_M = {"vgg_a": 133, "vgg_a_lrn": 133, "vgg_b": 133, "vgg_c": 134, "vgg_d": 138, "vgg_e": 144}


def weight_layers(model: nn.Module) -> int:
    return sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())


def vgg(out: Path, *, quick: bool, seed: int, progress=None) -> Section:
    rows: list[Number] = []
    for name, layers in VGG_LAYERS.items():
        model, s = meta_summary(name)
        k = weight_layers(model)
        rows.append(Number(f"{name} weight layers", str(layers), str(k), k == layers))
        rows.append(Number(f"{name} parameters (paper's Table 2, millions)", str(VGG_PARAMS_M[name]),
                           n(s.total_params), round(s.total_params / 1e6) == VGG_PARAMS_M[name],
                           "Table 2 of the paper"))
        convs = {c["kernel"] for c in layer_cells(model) if not c.get("fc")}
        sizes = ", ".join(f"{k}x{k}" for k in sorted(convs))
        if name != "vgg_c":
            rows.append(Number(f"{name} kernel sizes", "3x3 for all layers", sizes, convs == {3}))
        else:
            rows.append(Number("vgg_c kernel sizes", "3x3 and conv1 (1x1)", sizes, convs == {1, 3},
                               "configuration C has 1x1 layers; 'all layers' holds for the others"))
    _, s = meta_summary("vgg_d")
    rows.append(Number("VGG D multiply-adds per 224x224 image", "-", f"{s.macs / 1e9:.2f} G", None,
                       "the lecture prints none; 15.47 G is the commonly quoted figure"))
    text = ("Simonyan and Zisserman (ICLR 2015), configurations A to E built from the paper's Table 1.\n\n"
            + table(rows))
    return Section("vgg", "Model architecture - very deep CNN (VGG)", text, numbers=rows,
                   command="cnnkit summary vgg_d")


def deep_image(out: Path, *, quick: bool, seed: int, progress=None) -> Section:
    from cnnkit.lecture.augment_counts import deep_image_counts, draw_augmentations

    model, s = meta_summary("deep_image")
    k = weight_layers(model)
    rows = [Number("Deep Image layers", "16", str(k), k == 16, "13 conv + 3 FC")]
    fc = [c["filters"] for c in layer_cells(model) if c.get("fc")]
    rows.append(Number("Deep Image FC 1-2 width", "6144", f"{fc[0]}, {fc[1]}", fc[:2] == [6144, 6144]))
    wide = [c["filters"] for c in layer_cells(build_meta("deep_image", fc_width=8192)) if c.get("fc")]
    rows.append(Number("widest FC variant", "upto 8192", str(wide[0]), wide[0] == 8192, "fc_width=8192"))
    cells = [c for c in layer_cells(model) if not c.get("fc")]
    groups = [c["filters"] for c in cells if c["pool"]]  # the width of each group, read at its pool
    rows.append(Number("Deep Image filters per conv group", "64, 128, 256, 512, 512", ", ".join(map(str, groups)),
                       groups == [64, 128, 256, 512, 512], "groups of 2, 2, 3, 3, 3 convolutions"))
    counts = deep_image_counts()
    rows += counts.numbers
    figure = draw_augmentations(out / "deep_image_augment.png", seed).name
    text = ("Wu, Yan, Shan, Dang and Sun (2015). The layer table is VGG D's layout with 6144-wide FC layers. "
            "The augmentation table counts 'possible changes' per kind; the paper gives no formula for them. "
            "Below, each count is worked out from the parameters of cnnkit's own transform (`cnnkit augment`), "
            "with the reading of the paper's number that makes it come out, where there is one.\n\n"
            + table(rows) + "\n" + counts.markdown + f"\n![Deep Image's augmentations]({figure})\n")
    return Section("deep_image", "Model architecture - Deep Image (Baidu)", text, figures=[figure],
                   numbers=rows, command="cnnkit augment --show cast,vignette,lens,rotate,flip,crop")


def nin(out: Path, *, quick: bool, seed: int, progress=None) -> Section:
    _, s_nin = meta_summary("nin")
    _, s_alex = meta_summary("alexnet")
    rows = [
        Number("NIN parameters", "7.5 Million", n(s_nin.total_params), close(7.5e6, s_nin.total_params, 0.02)),
        Number("NIN size (float32)", "29 Megabytes", f"{s_nin.total_params * 4 / MIB:.1f} MiB",
               close(29, s_nin.total_params * 4 / MIB, 0.03), "4 bytes per parameter; megabytes read as MiB"),
        Number("AlexNet parameters", "60 Million", n(s_alex.total_params), close(60e6, s_alex.total_params, 0.02)),
        Number("AlexNet size (float32)", "230 Megabytes", f"{s_alex.total_params * 4 / MIB:.1f} MiB",
               close(230, s_alex.total_params * 4 / MIB, 0.03), "4 bytes per parameter; megabytes read as MiB"),
        Number("AlexNet / NIN parameters", "60 / 7.5 = 8x", f"{s_alex.total_params / s_nin.total_params:.1f}x",
               close(8, s_alex.total_params / s_nin.total_params, 0.05)),
    ]
    text = ("Lin, Chen and Yan (ICLR 2014): 1x1 convolutions after each convolution, no fc6/fc7. Sizes are the "
            "float32 weights.\n\n" + table(rows))
    return Section("nin", "Model architecture - Network in Network", text, numbers=rows, command="cnnkit summary nin")


def googlenet(out: Path, *, quick: bool, seed: int, progress=None) -> Section:
    from cnnkit.models.googlenet import TABLE1, Inception

    model = build_meta("googlenet")
    params = Reference("params K", {k: v[0] for k, v in TABLE1.items()}, lambda r: r.weights / 1024, 0.02)
    ops = Reference("ops M", {k: v[1] for k, v in TABLE1.items()}, lambda r: r.macs / 1e6, 0.02)
    s = summary(model, (3, 224, 224), collapse=(Inception, "features.conv2"), references=[params, ops])
    rows: list[Number] = []
    for ref, unit in zip(s.references, ("params (K = 1024 weights)", "ops (M multiply-adds)")):
        for c in s.compare(ref):
            agrees = c.computed is not None and c.agrees(ref.rtol)
            rows.append(Number(f"GoogLeNet {c.row} {unit}", f"{c.printed:g}",
                               "-" if c.computed is None else f"{c.computed:.4g}", agrees,
                               "" if agrees else "the paper's row does not match its own layer sizes"))
    widths = [r.output_shape[0] for r in s.rows if r.type == "Inception"]
    rows.append(Number("inception widths", "256 (early) to 1024 (top)", f"{widths[0]} to {widths[-1]}",
                       (widths[0], widths[-1]) == (256, 1024)))
    rows.append(Number("GoogLeNet parameters", "-", n(s.total_params), None,
                       "the paper's Table 1 sums to about 6.8 M weights; no total is printed in the lecture"))
    text = ("Szegedy et al. (CVPR 2015), Table 1 as the lecture shows it: 'params' are weights without biases "
            "in units of 1024, 'ops' multiply-adds in millions (a 2% tolerance for the printed rounding).\n\n"
            "```\n" + s.to_table() + "```\n\n" + table(rows))
    return Section("googlenet", "Model architecture - GoogLeNet", text, numbers=rows,
                   command="cnnkit summary googlenet")


def lenet(out: Path, *, quick: bool, seed: int, progress=None) -> Section:
    rows: list[Number] = []
    _, s = meta_summary("lenet5")
    rows.append(Number("LeNet-5 trainable parameters (LeCun et al. 1998)", "60,000", n(s.total_params), False,
                       "`lenet5`: every C3 map reads all six S2 maps, plain average pooling, tanh and a linear output "
                       "layer (the common modern reading)"))
    if "lenet5_1998" in list_models():
        _, s98 = meta_summary("lenet5_1998")
        rows.append(Number("LeNet-5 as in the paper", "60,000", n(s98.total_params), s98.total_params == 60_000,
                           "`lenet5_1998`: C3 connection table, trainable subsampling, scaled tanh, RBF output"))
    text = ("LeCun, Bottou, Bengio and Haffner (Proc. IEEE 1998), the lecture's first reading: the grid-structured "
            "network the lecture starts from.\n\n" + table(rows))
    return Section("lenet", "Convolutional neural network (LeCun et al. 98)", text, numbers=rows,
                   command="cnnkit summary lenet5_1998")
