"""Section "direct_maps": "Directly predict segmentation maps" (Luo, Wang, Tang, ICCV 2013) and why the
lecture moves on to fully convolutional nets: such a classifier "is location sensitive, has no
translation invariance: prediction not only depends on the neighborhood of the pixel, but also its
location". Measured on generated shapes (``cnnkit.lecture.exp_shapes``) seen only in one region
during training, then moved.
"""

from __future__ import annotations

import time
from pathlib import Path

from cnnkit.lecture import exp_shapes as shp
from cnnkit.lecture.exp_common import one_thread, quiet_runner, table
from cnnkit.lecture.section import Section
from cnnkit.utils import write_json_atomic

KEY = "direct_maps"
TEST_IMAGES = 128
SHIFTS = range(0, 13, 2)  # pixels the test objects are moved to the right


def build(out: Path, *, quick: bool, seed: int, progress: bool | None) -> Section:
    n, epochs = (192, 8) if quick else (768, 15)
    train = shp.shapes(n, seed, shp.TRAIN_COLUMNS)
    val = shp.shapes(64, seed + 1, shp.TRAIN_COLUMNS)
    # the same seed: the same objects and backgrounds, each object moved 12 pixels to the right
    tests = {"in the training region": shp.shapes(TEST_IMAGES, seed + 2, shp.TRAIN_COLUMNS),
             "moved 12 px right": shp.shapes(TEST_IMAGES, seed + 2, shp.SHIFTED_COLUMNS)}
    with one_thread(), quiet_runner():
        t0 = time.perf_counter()
        run = out / "runs" / KEY / f"direct-map-{'quick' if quick else 'full'}-seed{seed}"
        direct, _ = shp.train_map_net(run, shp.DIRECT_MAP, shp.direct_map_net, lambda m: m, train, val,
                                      epochs=epochs, seed=seed, progress=progress)
        t_direct = time.perf_counter() - t0
        t0 = time.perf_counter()
        patch_model, _ = shp.trained_patch_net(out, quick=quick, seed=seed, progress=progress)
        t_patch = time.perf_counter() - t0
        nets = {"direct map (FC head outputs 2x32x32)": direct, "patch classifier, exact dense": shp.dense(patch_model)}
        preds = {(name, cond): shp.predict_scores(net, images).argmax(1)
                 for name, net in nets.items() for cond, (images, _) in tests.items()}
        sweep = {}  # object IoU against the distance the objects were moved
        for dx in SHIFTS:
            images, target = shp.shapes(TEST_IMAGES, seed + 2, tuple(c + dx for c in shp.TRAIN_COLUMNS))
            for name, net in nets.items():
                sweep[name, dx] = shp.scores_metrics(shp.predict_scores(net, images).argmax(1), target)["iou"]
    results = {(name, cond): shp.scores_metrics(preds[name, cond], tests[cond][1])
               for name in nets for cond in tests}
    rows = []
    for name in nets:
        row = [name]
        for cond in tests:
            row += [results[name, cond]["pixel_accuracy"], results[name, cond]["iou"]]
        rows.append(row)
    background = [float((t[1] == 0).float().mean()) for t in tests.values()]
    rows.append(["(every pixel 'background')", background[0], 0.0, background[1], 0.0])
    header = ["net"] + [f"{what}, {cond}" for cond in tests for what in ("pixel accuracy", "object IoU")]
    write_json_atomic(out / "runs" / KEY / "results.json",
                      {**{f"{name} | {cond}": r for (name, cond), r in results.items()},
                       "iou_by_shift": {f"{name} | {dx}": v for (name, dx), v in sweep.items()}})
    figure, fig_shift = f"{KEY}_predictions.png", f"{KEY}_shift.png"
    _plot(out / figure, tests, preds, list(nets))
    _plot_sweep(out / fig_shift, sweep, list(nets))
    cond_in, cond_moved = list(tests)
    d, p = list(nets)
    markdown = f"""The lecture's first answer to pixelwise labelling is to "directly predict segmentation maps"
(Luo, Wang, Tang, ICCV 2013): a net whose fully connected output layer has one unit per pixel and class.
Its caveat: the classifier "is location sensitive, has no translation invariance"; the prediction for a
pixel depends on where the pixel is, so it suits images "with regular structures, such as faces and
humans".

**What was run.** {n} generated 32x32 images, one bright striped disc or square (the object) on a
blob texture, the object's centre always in columns {shp.TRAIN_COLUMNS[0]:g}-{shp.TRAIN_COLUMNS[1]:g}
(left part). Two nets trained for {epochs} epochs by the runner (Adam, class-balanced pixelwise
cross-entropy): a direct-map net (two conv + pool layers, FC 256, FC 2x32x32 reshaped to the map;
{sum(q.numel() for q in direct.parameters()):,} parameters; {t_direct:.1f} s) and the `segment` patch
classifier on 20x20 patches ({sum(q.numel() for q in patch_model.parameters()):,} parameters;
{t_patch:.1f} s), trained and run exactly densely (`cnnkit.dense.densify`, the lecture's d-regularly
sparse kernels). Both are tested on {TEST_IMAGES} new images with objects in the training region and
on the same images with every object moved 12 pixels right (same backgrounds).

{table(header, rows)}

![predictions]({figure})

![IoU against shift]({fig_shift})

**Result.** In the training region both nets label the objects (object IoU
{results[d, cond_in]['iou']:.2f} direct map, {results[p, cond_in]['iou']:.2f} dense patch classifier).
Moved, the direct map falls to IoU {results[d, cond_moved]['iou']:.2f}: its output units for the right
half never saw an object during training and keep answering "background" (or paint the object where
objects used to be), exactly the location sensitivity the slide warns about. The patch classifier
applies the same weights at every pixel, so moving the object moves its labels with it (IoU
{results[p, cond_moved]['iou']:.2f}). The second figure moves the objects step by step: the direct map's IoU
falls with the distance ({', '.join(f"{sweep[d, k]:.2f}" for k in SHIFTS)} for
{', '.join(map(str, SHIFTS))} px), the dense patch classifier's stays flat
({min(sweep[p, k] for k in SHIFTS):.2f}-{max(sweep[p, k] for k in SHIFTS):.2f}). That translation equivariance is
what the fully convolutional form in the next slides keeps.
"""
    return Section(key=KEY, title="Directly Predict Segmentation Maps", markdown=markdown, figures=[figure, fig_shift],
                   numbers=[], command=f"cnnkit lecture --only {KEY}")


def _plot(path: Path, tests, preds, names, examples: int = 3) -> None:
    from cnnkit.train.plots import plt, save_figure

    conds = list(tests)
    columns = ["image", "truth", "direct map", "dense patch classifier"]
    fig, axes = plt.subplots(examples * len(conds), len(columns), figsize=(6.4, 1.7 * examples * len(conds)))
    for i in range(examples):
        for j, cond in enumerate(conds):
            images, target = tests[cond]
            ax_row = axes[2 * i + j]
            pictures = [images[i, 0], target[i], preds[names[0], cond][i], preds[names[1], cond][i]]
            for k, (ax, pic) in enumerate(zip(ax_row, pictures)):
                ax.imshow(pic.float().numpy(), cmap="gray", vmin=None if k == 0 else 0, vmax=None if k == 0 else 1)
                ax.set_xticks([])
                ax.set_yticks([])
                if 2 * i + j == 0:
                    ax.set_title(columns[k], fontsize=8)
            ax_row[0].set_ylabel(cond.replace(" the training", "\ntraining").replace(" 12 px", "\n12 px"), fontsize=7)
    fig.suptitle("objects in the training region (rows 1, 3, 5) and the same images with the object moved")
    save_figure(fig, path)



def _plot_sweep(path: Path, sweep, names) -> None:
    from cnnkit.train.plots import plt, save_figure

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for name, marker in zip(names, "os"):
        ax.plot(list(SHIFTS), [sweep[name, d] for d in SHIFTS], f"{marker}-", label=name)
    ax.set(xlabel="objects moved right by (pixels; 0: the training positions)", ylabel="object IoU", ylim=(0, 1.02),
           title="location sensitivity: the same test objects, moved")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path)
