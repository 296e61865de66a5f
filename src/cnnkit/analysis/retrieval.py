"""Features from any named layer, and image retrieval with them.

The lecture (after Krizhevsky et al. 2012): "the top hidden layer can be used as feature for
retrieval": images whose feature vectors are close show the same kind of object, although pixel
distances between them are large. Chatfield et al. (BMVC 2014) add that L2-normalising the features
matters (about 5% mAP on VOC 2007); :func:`evaluate_retrieval` therefore measures both.

Ranking: each query ranks the whole database by distance (Euclidean or cosine). Precision@k is the
fraction of the k nearest that share the query's class; average precision (AP) is the mean of the
precision at the rank of every relevant item; mAP is the mean AP over queries. Ties are broken by
database order (a stable sort), so results are deterministic. By chance (random ranking) the mAP is
close to the fraction of relevant items, about 0.1 for ten balanced classes.

:func:`evaluate_retrieval` is exact and streams: chunks of queries sized to a memory budget, each
chunk's distances sorted once, and only the ranks of the relevant items kept. CIFAR-10 (10,000 queries
against 50,000 images, LeNet-5) takes about 30 s of CPU time and 0.75 GB; see benchmarks/retrieval.py.
"""

from __future__ import annotations

import json
import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader, Subset

from cnnkit.analysis.common import check_layer, checkpoint_splits, image_tile, load_images, save_png
from cnnkit.analysis.ranking import (  # noqa: F401 - the ranking is part of this module's interface
    DISTANCE_ROWS,
    METRICS,
    RANKING_MEMORY,
    Database,
    distances,
    evaluate_retrieval,
    l2_normalise,
    nearest,
    relevant_ranks,
    stable_order,
)
from cnnkit.data import labels_of
from cnnkit.data.common import ArrayDataset
from cnnkit.errors import CheckpointError, ConfigError, DataError
from cnnkit.models import extract_features
from cnnkit.utils import atomic_path

log = logging.getLogger(__name__)

FEATURE_SUFFIXES = (".npy", ".safetensors")
# The pixel baseline: its cost per ranking, queries x database x pixels multiply-adds (1e11 is seconds on
# two cores; the whole of CIFAR-10, 1.5e12, would take minutes), and the pixels it holds in memory.
PIXEL_BASELINE_LIMIT = 100_000_000_000
PIXEL_VALUES_LIMIT = 250_000_000  # float32 values (1 GB), queries' and database's together
QUERY_SEED = 0  # the random subset of queries that `queries` keeps
FEATURE_BATCH_BYTES = 32 * 2**20  # float32 input images per forward pass of compute_features
WEIGHTED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# --------------------------------------------------------------------------- features


def default_feature_layer(model: nn.Module) -> str:
    """The top hidden layer: the last module whose output feeds the output layer (dropout skipped)."""
    leaves = [(n, m) for n, m in model.named_modules() if n and next(m.children(), None) is None]
    last = max((i for i, (_, m) in enumerate(leaves) if isinstance(m, WEIGHTED)), default=None)
    candidates = [n for n, m in leaves[:last] if not isinstance(m, (nn.Dropout, nn.Flatten))] if last else []
    if not candidates:
        raise ConfigError("the model has no hidden layer before its output layer; pass --layer NAME")
    name, short = candidates[-1], candidates[-1].rsplit(".", 1)[-1]
    return short if sum(n.rsplit(".", 1)[-1] == short for n, _ in leaves) == 1 else name


def image_batches(images, batch_size: int = 256):
    """(B, C, H, W) float32 batches in [0, 1], in order, of a dataset or an (N, C, H, W) tensor. An
    :class:`ArrayDataset` is sliced as its item method would (no per-item indexing, no second copy)."""
    if torch.is_tensor(images):
        yield from images.split(batch_size)
    elif isinstance(images, ArrayDataset):
        for x in images.images.split(batch_size):  # (B, C0, H, W), C0 = 1 or images.channels
            x = x.float().div_(255) if x.dtype == torch.uint8 else x.clone()
            yield x.repeat(1, images.channels, 1, 1) if x.shape[1] != images.channels else x
    else:
        yield from (x for x, _ in DataLoader(images, batch_size=batch_size, shuffle=False))


@torch.no_grad()
def compute_features(model: nn.Module, images, layer: str, *, mean: torch.Tensor | None = None,
                     batch_size: int | None = None, l2: bool = False, progress: bool | None = None,
                     desc: str = "features") -> torch.Tensor:
    """(N, D) float32 features of ``layer`` (flattened) for a dataset or an (N, C, H, W) tensor.

    ``batch_size`` defaults to as many images as fit in :data:`FEATURE_BATCH_BYTES`, at most 1024:
    small images go in large batches (LeNet-5 on CIFAR-10 runs 2-3x faster at 1024 than at 256),
    large ones in small batches, which bounds the activations' memory.
    """
    from cnnkit.train.engine import bar

    model.eval()
    param = next(model.parameters())
    n = len(images)
    if n == 0:
        raise DataError("no images to compute features for")
    if batch_size is None:
        first = images[0] if torch.is_tensor(images) else images[0][0]  # (C, H, W)
        batch_size = max(1, min(1024, FEATURE_BATCH_BYTES // (4 * first.numel())))
    mean = None if mean is None else mean.to(param.device, param.dtype)
    features, start = None, 0
    for x in bar(image_batches(images, batch_size), progress, desc, total=-(-n // batch_size)):
        x = x.to(param.device, param.dtype)
        if mean is not None:
            x = x - mean  # the mean image the network was trained with
        f = extract_features(model, x, [layer])[layer].flatten(1).float().cpu()  # (B, D)
        if features is None:
            features = torch.empty(n, f.shape[1])  # filled in place: the features are never held twice
        features[start:start + len(f)] = f
        start += len(f)
    return l2_normalise(features) if l2 else features


def save_features(path: str | Path, features: torch.Tensor, *, labels: torch.Tensor | None = None,
                  meta: dict | None = None) -> list[Path]:
    """Write features atomically: ``.safetensors`` (features, labels and meta in one file) or ``.npy``
    (the (N, D) array; meta and labels go to a ``.json`` file beside it). Returns the files written."""
    path = Path(path)
    if path.suffix not in FEATURE_SUFFIXES:
        raise ConfigError(f"feature file {path} must end in .npy or .safetensors")
    meta = dict(meta or {})
    features = features.detach().float().cpu().contiguous()
    if path.suffix == ".safetensors":
        tensors = {"features": features}
        if labels is not None:
            tensors["labels"] = labels.long().cpu().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"cnnkit": json.dumps(meta)})
        return [path]
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, features.numpy())  # a file handle: np.save would append .npy to a path
    side = path.with_suffix(".json")
    if labels is not None:
        meta["labels"] = labels.tolist()
    with atomic_path(side) as tmp:
        tmp.write_text(json.dumps(meta, indent=1) + "\n")
    return [path, side]


def load_features(path: str | Path) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """(features, labels or None, meta) from a file written by :func:`save_features`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"feature file {path} does not exist; write one with `cnnkit features`")
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("cnnkit", "{}"))
                labels = f.get_tensor("labels") if "labels" in f.keys() else None
                return f.get_tensor("features"), labels, meta
        features = torch.from_numpy(np.load(path, allow_pickle=False))
    except Exception as exc:
        raise DataError(f"cannot read feature file {path} ({type(exc).__name__}); "
                        "pass a .npy or .safetensors file written by `cnnkit features`") from None
    side = path.with_suffix(".json")
    meta = json.loads(side.read_text()) if side.is_file() else {}
    labels = torch.tensor(meta.pop("labels")) if "labels" in meta else None
    return features, labels, meta


# --------------------------------------------------------------------------- the picture


def plot_neighbours(path: str | Path, query_images: torch.Tensor, neighbour_images: torch.Tensor,
                    match: torch.Tensor | None = None, *, tile: int = 56) -> Path:
    """Each row: a query (blue frame), a gap, then its neighbours nearest first, framed green when
    of the query's class and red when not (grey when the query's class is unknown)."""
    q, k = neighbour_images.shape[:2]  # (Q, k, C, H, W)
    border, gap = 3, 12
    cell = tile + 2 * border + 4
    canvas = np.full((q * cell + 4, (k + 1) * cell + gap + 4, 3), 255, dtype=np.uint8)
    colours = {None: (150, 150, 150), True: (30, 160, 60), False: (210, 40, 40)}
    for i in range(q):
        row = [(query_images[i], (40, 90, 220))]
        for j in range(k):
            ok = None if match is None else bool(match[i, j])
            row.append((neighbour_images[i, j], colours[ok]))
        for j, (image, colour) in enumerate(row):
            y, x = 2 + i * cell, 2 + j * cell + (gap if j else 0)
            canvas[y:y + tile + 2 * border, x:x + tile + 2 * border] = colour
            canvas[y + border:y + border + tile, x + border:x + border + tile] = image_tile(image, tile)
    return save_png(path, canvas)


# --------------------------------------------------------------------------- the commands


def _prepare(checkpoint, device: str, layer: str | None):
    from cnnkit.train.checkpoint import load_checkpoint
    from cnnkit.utils import resolve_device

    ckpt = load_checkpoint(checkpoint)
    if ckpt.mean_image is None:
        raise CheckpointError(f"{checkpoint} holds no mean image; pass a checkpoint from `cnnkit train`")
    model = ckpt.build_model().to(resolve_device(device)).eval()
    return ckpt, model, check_layer(model, layer) if layer else default_feature_layer(model)


def export_features(checkpoint, out: str | Path, *, layer: str | None = None, split: str = "val",
                    data: str | None = None, images: list[Path] | None = None, l2: bool = False,
                    device: str = "auto") -> dict:
    """Features of ``layer`` for a split of the checkpoint's data (or for image files), to ``out``."""
    from cnnkit.train.evaluation import expand_image_paths

    if Path(out).suffix not in FEATURE_SUFFIXES:
        raise ConfigError(f"feature file {out} must end in .npy or .safetensors")
    if split not in ("train", "val", "all"):
        raise ConfigError(f"unknown split {split!r}; use train, val or all")
    ckpt, model, layer = _prepare(checkpoint, device, layer)
    meta = {"checkpoint": str(checkpoint), "layer": layer, "l2_normalised": l2, "classes": list(ckpt.classes)}
    if images:
        files = expand_image_paths(images)
        features = compute_features(model, load_images(files, ckpt), layer, mean=ckpt.mean_image, l2=l2)
        labels = None
        meta.update(source="files", files=[str(f) for f in files])
    else:
        splits = checkpoint_splits(ckpt, data)
        parts = {"train": [splits.train], "val": [splits.val], "all": [splits.train, splits.val]}[split]
        features = torch.cat([compute_features(model, p, layer, mean=ckpt.mean_image, l2=l2) for p in parts])
        labels = torch.cat([labels_of(p) for p in parts])
        meta.update(source=splits.description, split=split)
    written = save_features(out, features, labels=labels, meta=meta)
    return {"files": [str(p) for p in written], "shape": list(features.shape), "layer": layer, "l2": l2}


def _normalised(x: torch.Tensor, norm: str) -> torch.Tensor:
    return l2_normalise(x) if norm == "l2" else x


def query_subset(total: int, n: int | None) -> torch.Tensor | None:
    """Indices, in increasing order, of a random subset of ``n`` of ``total`` queries drawn with
    :data:`QUERY_SEED` (the same subset in every run), or None for all of them."""
    if n is not None and n < 1:
        raise ConfigError(f"the number of queries must be at least 1, got {n}")
    if n is None or n >= total:
        return None
    return torch.randperm(total, generator=torch.Generator().manual_seed(QUERY_SEED))[:n].sort().values


def _subset(dataset, index: torch.Tensor | None):
    if index is None:
        return dataset
    return dataset.subset(index) if isinstance(dataset, ArrayDataset) else Subset(dataset, index.tolist())


def pixel_baseline_skipped(queries: int, database: int, pixels: int) -> str | None:
    """Why the pixel baseline is not run for this size (in words), or None when it is."""
    work, values = queries * database * pixels, (queries + database) * pixels
    if work <= PIXEL_BASELINE_LIMIT and values <= PIXEL_VALUES_LIMIT:
        return None
    if values > PIXEL_VALUES_LIMIT:
        return (f"{queries + database} images x {pixels} pixels would hold {4 * values / 2**30:.1f} GiB, "
                f"over the limit of {4 * PIXEL_VALUES_LIMIT / 2**30:.1f} GiB")
    return (f"{queries} queries x {database} images x {pixels} pixels = {work:.1e} multiply-adds per ranking, "
            f"over the limit of {PIXEL_BASELINE_LIMIT:.0e}; pass --queries "
            f"{PIXEL_BASELINE_LIMIT // (database * pixels)} or fewer to include it")


def run_retrieval(checkpoint, *, layer: str | None = None, metric: str = "euclidean", ks=(1, 5, 10),
                  data: str | None = None, images: list[Path] | None = None, out: str | Path | None = None,
                  normalise: str = "l2", show: int = 8, show_k: int = 8, queries: int | None = None,
                  device: str = "auto", progress: bool | None = None) -> dict:
    """Queries (held-out split, or image files) against the training split as database.

    Every labelled run reports mAP and precision@k for raw and for L2-normalised features side by
    side, and the same for raw pixels while that stays small enough (see :func:`pixel_baseline_skipped`);
    the neighbours picture uses ``normalise`` ("l2" or "none"). ``queries`` keeps a seeded random
    subset of that many queries (default all).
    """
    from cnnkit.train.evaluation import expand_image_paths

    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if normalise not in ("l2", "none"):
        raise ConfigError(f"--normalise must be l2 or none, got {normalise!r}")
    if any(int(k) < 1 for k in ks):
        raise ConfigError(f"every k of precision@k must be at least 1, got {list(ks)}")
    ckpt, model, layer = _prepare(checkpoint, device, layer)
    splits = checkpoint_splits(ckpt, data)
    if images:
        files = expand_image_paths(images)
        available, index = len(files), query_subset(len(files), queries)
        files = files if index is None else [files[int(i)] for i in index]
        query_set, q_labels = load_images(files, ckpt), None
    else:
        index = query_subset(len(splits.val), queries)
        query_set, available = _subset(splits.val, index), len(splits.val)
        q_labels = labels_of(query_set)
    features = partial(compute_features, model, layer=layer, mean=ckpt.mean_image, progress=progress)
    database = features(splits.train, desc="database features")
    db_labels = labels_of(splits.train)
    q_features = features(query_set, desc="query features")
    result = {"checkpoint": str(checkpoint), "layer": layer, "metric": metric, "dimensions": database.shape[1],
              "queries": len(q_features), "queries_available": available, "query_seed": QUERY_SEED,
              "database": len(database), "rows": []}
    if q_labels is not None:
        runs = [(layer, norm, _normalised(q_features, norm), _normalised(database, norm)) for norm in ("none", "l2")]
        skipped = pixel_baseline_skipped(len(query_set), len(splits.train), ckpt.mean_image.numel())
        if skipped is None:
            # The baseline the lecture's claim is about: the same ranking on raw (mean-subtracted) pixels. The
            # database's pixels go straight into the form the distance products use, one normalisation at a time.
            def pixels(dataset, norm):  # (B, C*H*W) batches
                return (_normalised((x - ckpt.mean_image).flatten(1), norm) for x in image_batches(dataset, 1024))

            size = ckpt.mean_image.numel()
            runs += [("pixels", norm, torch.cat(list(pixels(query_set, norm))),
                      partial(Database, pixels(splits.train, norm), len(splits.train), size, metric))
                     for norm in ("none", "l2")]
        else:
            result["pixels_skipped"] = skipped
        for source, norm, q, db in runs:
            scores = evaluate_retrieval(q, q_labels, db if torch.is_tensor(db) else db(), db_labels, metric=metric,
                                        ks=ks, progress=progress, desc=f"ranking {source} {norm}")
            scores.pop("ap"), scores.pop("precision")
            result["rows"].append({"features": source, "normalisation": norm, **scores})
            log.debug("%s, %s features, %s: mAP %.4f (chance %.4f), %s", source, norm, metric, scores["map"],
                      scores["chance_map"],
                      ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k.startswith("precision")))
    if out is not None:
        from cnnkit.utils import ensure_writable_dir, write_json_atomic

        out = ensure_writable_dir(out)
        shown = torch.linspace(0, len(q_features) - 1, min(show, len(q_features))).round().long().unique()
        idx = nearest(_normalised(q_features[shown], normalise), _normalised(database, normalise), show_k, metric)
        q_imgs = query_set[shown] if images else torch.stack([query_set[int(i)][0] for i in shown])
        n_imgs = torch.stack([torch.stack([splits.train[int(j)][0] for j in row]) for row in idx])  # (S, k, C, H, W)
        match = None if q_labels is None else db_labels[idx] == q_labels[shown][:, None]
        png = plot_neighbours(out / "neighbours.png", q_imgs, n_imgs, match)
        result["neighbours_png"] = str(png)
        write_json_atomic(out / "retrieval.json", result)
    return result
