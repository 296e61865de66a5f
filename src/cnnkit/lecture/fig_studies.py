"""The lecture's studies redrawn at toy scale on digits with cnnkit's study code: transferability of
features (``analysis.transfer``, Yosinski et al.), retrieval with top-layer features
(``analysis.retrieval``) and the components study (``analysis.ablate``, Chatfield et al.). The paper's
ImageNet / VOC 2007 values are listed beside, as values that need ImageNet.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

from cnnkit.analysis.ablate import AblateConfig, run_ablation
from cnnkit.analysis.retrieval import run_retrieval
from cnnkit.analysis.transfer import TransferConfig, run_transfer
from cnnkit.lecture.fig_common import command, md_table, runs_folder
from cnnkit.lecture.section import Number, Section
from cnnkit.train.runner import TrainConfig
from cnnkit.utils import atomic_path

# Chatfield et al. (BMVC 2014) as the lecture quotes them: ImageNet pre-training, VOC 2007 fine-tuning
PAPER = [
    ("mAP by architecture (VOC 2007)", "CNN-S > (marginally) CNN-M > (~2.5%) CNN-F"),
    ("data augmentation: flipping", "almost no improvement"),
    ("data augmentation: 5 crops + flips", "~3% improvement"),
    ("grey-scale vs colour", "~3% drop"),
    ("FC7 2048 / 1024 instead of 4096", "marginally better"),
    ("FC7 128 instead of 4096", "~2% drop (32x smaller feature)"),
    ("ranking hinge loss instead of softmax", "~2.7% improvement"),
    ("L2 normalising the features (VOC 2007)", "~5% of accuracy"),
    ("ILSVRC-2012 top-5 error: CNN-S, CNN-M, CNN-F, AlexNet", "13.1%, 13.7%, 16.7%, 17%"),
]


def _copy(src: str | Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def _scale(quick: bool) -> dict:
    if quick:  # a smoke run: one epoch per network, the smallest nets that still have the layers
        return {"epochs": 1, "options": {"channels": [8, 16], "fc_width": [32]},
                "transfer_options": {"channels": [8], "fc_width": [32]}, "values": {
                    "kernel_size": [3, 5], "fc_width": [[8], [32]], "augment": ["", "flip"], "average": [1, 2]}}
    return {"epochs": 6, "options": {}, "transfer_options": {}, "values": {
        "kernel_size": [3, 5, 7], "channels": [[8, 16], [16, 32], [32, 64]], "stride": [1, 2],
        "fc_width": [[16], [64], [256]], "augment": ["", "flip", "crop,flip"], "average": [1, 3, 5]}}


def build_studies(out: Path, *, quick: bool, seed: int, progress: bool | None = None) -> Section:
    from cnnkit.train.plots import plt, save_figure

    key = "studies"
    sc = _scale(quick)
    runs = runs_folder(out, key) / ("quick" if quick else "full") / f"seed{seed}"
    # transferability (Yosinski et al.): baseA, baseB, BnB, BnB+, AnB, AnB+ for every n
    tr = run_transfer(TransferConfig(data="digits", model="small_cnn", model_options=sc["transfer_options"],
                                     epochs=sc["epochs"], batch_size=32, seed=seed, out=str(runs / "transfer"),
                                     device="cpu"),
                      progress=progress)
    transfer_png = f"{key}_transfer.png"
    _copy(tr["plot"], out / transfer_png)
    # components (Chatfield et al.): one axis at a time around the same base network
    base = TrainConfig(model="small_cnn", model_options=sc["options"], epochs=sc["epochs"], lr=0.05, batch_size=32,
                       schedule="none", seed=seed, device="cpu")
    ablation = {}
    for axis, values in sc["values"].items():
        res = run_ablation(AblateConfig(base=replace(base), grid={axis: values}, out=str(runs / "ablate" / axis)),
                           progress=progress)
        ablation[axis] = [(c["cell"][axis], c) for c in res["cells"]]
    # retrieval with the top hidden layer of the base network (the first member of the averaging study)
    member = sorted((runs / "ablate" / "average" / "runs").glob("*/last.safetensors"))[0]
    ret = run_retrieval(member, out=runs / "retrieval", show=6, show_k=8, device="cpu")
    retrieval_png = f"{key}_retrieval.png"
    _copy(ret["neighbours_png"], out / retrieval_png)

    fig, axes = plt.subplots(1, len(ablation), figsize=(2.6 * len(ablation), 3.4), sharey=True)
    for ax, (axis, cells) in zip(axes, ablation.items()):
        labels = [str(v) if v != "" else "none" for v, _ in cells]
        errors = [100 * (1 - c["acc1"]) for _, c in cells]
        ax.bar(range(len(cells)), errors, color="tab:blue")
        for i, e in enumerate(errors):
            ax.text(i, e, f"{e:.1f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(cells)), labels, fontsize=7, rotation=20)
        ax.set_title(axis, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("held-out top-1 error (%)")
    fig.suptitle(f"components of a small CNN on digits ({sc['epochs']} epoch(s) per network)", fontsize=10)
    fig.tight_layout()
    components_png = f"{key}_components.png"
    save_figure(fig, out / components_png)

    rows = [[axis, str(v) if v != "" else "none", f"{c['acc1']:.3f}", f"{100 * (1 - c['acc1']):.1f}"]
            for axis, cells in ablation.items() for v, c in cells]
    comp_table = md_table(["component", "value", "held-out top-1", "top-1 error %"], rows)
    cells = tr["cells"]
    layers = tr["layers"]
    kinds = ("BnB", "BnB+", "AnB", "AnB+")
    tr_rows = [[n, *(f"{cells.get(f'{k}/{n}', {}).get('acc1', float('nan')):.3f}" for k in kinds)]
               for n in range(1, layers)]
    tr_table = md_table(["n", "BnB", "BnB+", "AnB", "AnB+"], tr_rows)
    by = {r["features"] + "/" + r["normalisation"]: r for r in ret["rows"]}
    feat = f"{ret['layer']}/l2"
    avg = dict(ablation["average"])
    aug = dict(ablation["augment"])
    flip = 100 * (aug[""]["acc1"] - aug["flip"]["acc1"])  # points of top-1 lost by flipping
    flip_note = (f"Flipping costs {flip:.1f} points here: digits are not mirror-symmetric (a mirrored 2 is no 2), "
                 "unlike VOC's natural images, where the lecture reports almost no change." if flip > 1 else
                 f"Flipping changes top-1 by {-flip:+.1f} points.")
    accs = [c.get("acc1", 0) for k, c in cells.items() if "/" in k]
    transfer_note = ("Digits are too easy for this study: every variant stays within a few points of 100%, so the "
                     "drop of AnB at higher n that Yosinski et al. measured on ImageNet cannot show at this scale."
                     if min(accs) > 0.95 else
                     "At this scale the curves are noisy; on ImageNet AnB falls for higher n while AnB+ recovers.")
    numbers = [Number(f"Chatfield et al.: {what}", lecture, "needs ImageNet", None,
                      "ImageNet pre-training, VOC 2007 fine-tuning; not reproducible offline")
               for what, lecture in PAPER]
    numbers += [
        Number("Yosinski et al.: AnB vs BnB (ImageNet halves)", "transferability drops with n; AnB+ recovers",
               "needs ImageNet", None, f"toy run on digits: table below (base B top-1 {cells['baseB']['acc1']:.3f})"),
        Number("retrieval mAP, top hidden layer vs pixels (digits, L2)", "top layer works for retrieval",
               f"{by[feat]['map']:.3f} vs {by['pixels/l2']['map']:.3f}", None,
               f"chance {by[feat]['chance_map']:.3f}; {'smoke run' if quick else 'digits'}"),
        Number("model averaging (digits): 1 vs the most members", "leads to improvement",
               f"{avg[min(avg)]['acc1']:.3f} vs {avg[max(avg)]['acc1']:.3f}", None,
               "held-out top-1; " + ("smoke run, 1 epoch" if quick else f"{sc['epochs']} epochs")),
    ]
    smoke = ("These are smoke runs (quick mode): one epoch per network, the smallest nets, a few cells (channels "
             "and stride only in the full run); differences between cells are mostly noise." if quick else
             f"Each network trains {sc['epochs']} epochs on scikit-learn's digits (1,797 8x8 images upsampled to "
             "32x32): differences of a percent are within the run-to-run noise at this scale.")
    text = f"""The lecture's last studies were run on ImageNet and PASCAL VOC 2007, which cnnkit cannot train
on offline, so the paper's numbers are listed as "needs ImageNet". What cnnkit can show is the same experiments at toy
scale with its own study code (`cnnkit.analysis.transfer`, `.retrieval`, `.ablate`; every network one
`runner.fit` run under `runs/{key}/`). {smoke}

**How transferable are features?** (Yosinski et al. NIPS'14) `{transfer_png}`: digits split into two halves
A = {{{', '.join(tr['A'])}}} and B = {{{', '.join(tr['B'])}}}; for each n the first n layers of baseB (BnB, selffer)
or baseA (AnB, transfer) are copied and frozen (or fine-tuned: +), the rest retrained on B.

{tr_table}

{transfer_note}

**Top hidden layer as a retrieval feature** (Krizhevsky et al.) `{retrieval_png}`: held-out digits (blue) and
their 8 nearest training images by the L2-normalised `{ret['layer']}` features (green: same class, red: not).
mAP {by[feat]['map']:.3f} with the features vs {by['pixels/l2']['map']:.3f} with raw pixels
(chance {by[feat]['chance_map']:.3f}).

**Components** (Chatfield et al. BMVC'14; Zeiler & Fergus) `{components_png}`: kernel size, channels, stride of
conv1, FC width, data augmentation and model averaging (posteriors of networks from different random
initialisations averaged), one at a time around the same base network.

{comp_table}

{flip_note}

The paper's values (ImageNet pre-training, VOC 2007 fine-tuning, as the lecture quotes them) are in the numbers.
"""
    return Section(key, "Transfer, retrieval and the components of CNNs", text,
                   [transfer_png, retrieval_png, components_png], numbers, command(key))
