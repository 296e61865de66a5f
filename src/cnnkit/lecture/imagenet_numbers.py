"""The lecture's results that need ImageNet (or PASCAL VOC, or the authors' GPUs): listed, not faked.

cnnkit has every architecture and training recipe behind these numbers (``cnnkit train --recipe``,
``cnnkit eval --tta``), but no ImageNet: each number is shown with its source and the command that
would measure it on a copy of ILSVRC-2012 that a user has.
"""

from __future__ import annotations

from pathlib import Path

from cnnkit.lecture.section import Number, Section
from cnnkit.lecture.zoo_numbers import table

IMAGENET = "needs ImageNet (ILSVRC-2012), not shipped"

# (what, lecture's value, source / how cnnkit would measure it)
RESULTS = [
    ("ILSVRC-2012 winner error (U. Toronto)", "0.15315", "the challenge's result table"),
    ("ILSVRC-2012 second (U. Tokyo)", "0.26172", "hand-crafted features"),
    ("ILSVRC-2012 third (U. Oxford)", "0.26979", "hand-crafted features"),
    ("ILSVRC-2012 fourth (Xerox/INRIA)", "0.27058", "hand-crafted features"),
    ("AlexNet 1 convnet val top-1 / top-5 error (%)", "40.7 / 18.2",
     "cnnkit train --model alexnet --recipe alexnet2012"),
    ("Clarifai 1 convnet val top-1 / top-5 error (%)", "38.4 / 16.5", "cnnkit train --model zfnet"),
    ("Clarifai, OverFeat-5, OverFeat-7 top-5 without augmentation (%)", "16.5 / 16.97 / 14.18", "Sermanet et al."),
    ("Clarifai, OverFeat-5, OverFeat-7 top-5 with augmentation (%)", "14.76 / 13.52 / 11.97", "Sermanet et al."),
    ("top-5 error: Clarifai, CNN-F, CNN-M, CNN-M 2048, CNN-S (%)", "16.0 / 16.7 / 13.7 / 13.5 / 13.1",
     "Chatfield et al. Table 2"),
    ("AlexNet top-5 error quoted beside CNN-F/M/S (%)", "17", "Chatfield et al."),
    ("VOC 2007 mAP: CNN-S > CNN-M > (~2.5%) CNN-F", "ordering", "fine-tuning on PASCAL VOC 2007"),
    ("VOC 2007: grey-scale vs colour", "~3% drop", "Chatfield et al."),
    ("VOC 2007: fc7 2048 / 1024 / 128", "marginally better / marginally better / ~2% drop", "Chatfield et al."),
    ("VOC 2007: ranking hinge loss instead of softmax", "~2.7% improvement", "Chatfield et al."),
    ("VOC 2007: L2-normalised features", "~5% of accuracy", "Chatfield et al.; cnnkit retrieve measures it"),
    ("VOC 2007: flipping / 5 crops + flips", "almost none / ~3%", "Chatfield et al."),
    ("VGG A, A-LRN, B top-1 / top-5 at S=Q=256 (%)", "29.6/10.4, 29.7/10.5, 28.7/9.9", "Simonyan & Zisserman Table 3"),
    ("VGG C at S=256, 384, [256;512] top-1 (%)", "28.1, 28.1, 27.3", "Table 3"),
    ("VGG D at S=256, 384, [256;512] top-1 (%)", "27.0, 26.8, 25.6", "Table 3"),
    ("VGG E at S=256, 384, [256;512] top-1 (%)", "27.3, 26.9, 25.5", "Table 3"),
    ("VGG multi-scale testing, E top-1 (%)", "25.5 => 24.8",
     "Table 4; cnnkit eval --tta multiscale --scales 256 384 512"),
    ("single-model top-5: GoogLeNet / VGG / Deep Image (%)", "7.89 / 8.0 / 7.42", "Wu et al. Table 4"),
    ("single-model top-1: VGG / Deep Image (%)", "25.9 / 24.88", "Wu et al. Table 4"),
    ("NIN vs AlexNet top-1 (%)", "39.2 vs 40.7", "Lin et al."),
    ("NIN vs AlexNet time to train on a GTX Titan", "4 days vs 8 days", "needs the GPU and ImageNet"),
    ("AlexNet training", "one week on two GPUs with 2 GB each", "Krizhevsky et al."),
    ("dense (d-regularly sparse) vs patch-by-patch speed-up", "more than 1,500X",
     "Li, Zhao, Wang on their nets and images; cnnkit's figure is in the pixelwise section"),
]


def imagenet(out: Path, *, quick: bool, seed: int, progress=None) -> Section:
    rows = [Number(what, value, "-", None, f"{IMAGENET}; {source}") for what, value, source in RESULTS]
    rows[-1].note = rows[-1].note.replace(IMAGENET + "; ", "")
    text = ("These results come from training on ImageNet (or fine-tuning on PASCAL VOC 2007) on the authors' "
            "GPUs. cnnkit builds every network and recipe they used but ships no ImageNet, so the numbers are "
            "listed with their source and not reproduced. With ILSVRC-2012 in an ImageNet-style folder, "
            "`cnnkit train --data PATH --recipe NAME` and `cnnkit eval --tta ...` measure them.\n\n" + table(rows))
    return Section("imagenet", "Results that need ImageNet", text, numbers=rows, command="cnnkit train --help")
