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
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from cnnkit.analysis.common import check_layer, checkpoint_splits, image_tile, load_images, save_png
from cnnkit.data import labels_of
from cnnkit.errors import CheckpointError, ConfigError, DataError
from cnnkit.models import extract_features
from cnnkit.utils import atomic_path

log = logging.getLogger(__name__)

METRICS = ("euclidean", "cosine")
FEATURE_SUFFIXES = (".npy", ".safetensors")
PIXEL_BASELINE_LIMIT = 200_000_000  # float32 values (800 MB): above this the pixel baseline is skipped
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


def l2_normalise(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit Euclidean length (a zero row stays zero)."""
    return x / x.norm(dim=1, keepdim=True).clamp_min(eps)


@torch.no_grad()
def compute_features(model: nn.Module, images, layer: str, *, mean: torch.Tensor | None = None,
                     batch_size: int = 256, l2: bool = False) -> torch.Tensor:
    """(N, D) float32 features of ``layer`` (flattened) for a dataset or an (N, C, H, W) tensor."""
    model.eval()
    param = next(model.parameters())
    batches = images.split(batch_size) if torch.is_tensor(images) else (
        x for x, _ in DataLoader(images, batch_size=batch_size, shuffle=False))
    chunks = []
    for x in batches:
        x = x.to(param.device, param.dtype)
        if mean is not None:
            x = x - mean.to(param.device, param.dtype)  # the mean image the network was trained with
        chunks.append(extract_features(model, x, [layer])[layer].flatten(1).float().cpu())  # (B, D)
    if not chunks:
        raise DataError("no images to compute features for")
    features = torch.cat(chunks)
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


# --------------------------------------------------------------------------- ranking and metrics


def distances(queries: torch.Tensor, database: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """(Q, N) distances: Euclidean, or cosine distance 1 - cos."""
    if metric == "euclidean":
        return torch.cdist(queries, database)
    if metric == "cosine":
        return 1 - l2_normalise(queries) @ l2_normalise(database).T
    raise ConfigError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")


def nearest(queries: torch.Tensor, database: torch.Tensor, k: int, metric: str = "euclidean",
            chunk: int = 256) -> torch.Tensor:
    """(Q, k) database indices of the k nearest items of each query, nearest first."""
    k = min(k, len(database))
    return torch.cat([distances(q, database, metric).sort(dim=1, stable=True).indices[:, :k]
                      for q in queries.split(chunk)])


def evaluate_retrieval(queries: torch.Tensor, query_labels: torch.Tensor, database: torch.Tensor,
                       database_labels: torch.Tensor, *, metric: str = "euclidean", ks=(1, 5, 10),
                       chunk: int = 64) -> dict:
    """mAP, precision@k, and the chance mAP (fraction of relevant items), over every query.

    Queries are processed in chunks, so memory is ``chunk x N`` whatever the number of queries.
    """
    if len(database) == 0 or len(queries) == 0:
        raise DataError("retrieval needs at least one query and one database item")
    if queries.shape[1] != database.shape[1]:
        raise DataError(f"query features have {queries.shape[1]} dimensions, database {database.shape[1]}; "
                        "compute both with the same layer")
    ks = sorted({min(int(k), len(database)) for k in ks})
    ap, hits_at = [], {k: [] for k in ks}
    positions = torch.arange(1, len(database) + 1, dtype=torch.float64)
    for q, ql in zip(queries.split(chunk), query_labels.split(chunk)):
        order = distances(q, database, metric).sort(dim=1, stable=True).indices  # (q, N) nearest first
        relevant = (database_labels[order] == ql[:, None]).double()  # (q, N) 1 where the class matches
        precision = relevant.cumsum(1) / positions  # precision at every rank
        n_rel = relevant.sum(1)
        ap.append(torch.where(n_rel > 0, (precision * relevant).sum(1) / n_rel.clamp_min(1), 0.0))
        for k in ks:
            hits_at[k].append(relevant[:, :k].mean(1))
    ap = torch.cat(ap)
    counts = torch.bincount(database_labels, minlength=int(max(database_labels.max(), query_labels.max())) + 1)
    chance = counts[query_labels].double() / len(database)
    return {"map": float(ap.mean()), "chance_map": float(chance.mean()),
            **{f"precision@{k}": float(torch.cat(v).mean()) for k, v in hits_at.items()},
            "queries": len(queries), "database": len(database), "ap": ap}


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


def run_retrieval(checkpoint, *, layer: str | None = None, metric: str = "euclidean", ks=(1, 5, 10),
                  data: str | None = None, images: list[Path] | None = None, out: str | Path | None = None,
                  normalise: str = "l2", show: int = 8, show_k: int = 8, device: str = "auto") -> dict:
    """Queries (held-out split, or image files) against the training split as database.

    Every labelled run reports mAP and precision@k for raw and for L2-normalised features side by
    side; the neighbours picture uses ``normalise`` ("l2" or "none").
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
    database = compute_features(model, splits.train, layer, mean=ckpt.mean_image)
    db_labels = labels_of(splits.train)
    if images:
        files = expand_image_paths(images)
        query_images = load_images(files, ckpt)
        queries, q_labels = compute_features(model, query_images, layer, mean=ckpt.mean_image), None
    else:
        queries, q_labels = compute_features(model, splits.val, layer, mean=ckpt.mean_image), labels_of(splits.val)
    result = {"checkpoint": str(checkpoint), "layer": layer, "metric": metric, "dimensions": database.shape[1],
              "queries": len(queries), "database": len(database), "rows": []}
    if q_labels is not None:
        sources = [(layer, (queries, database))]
        values = (len(splits.train) + len(splits.val)) * ckpt.mean_image.numel()
        if values <= PIXEL_BASELINE_LIMIT:
            # The baseline the lecture's claim is about: the same ranking on raw (mean-subtracted) pixels.
            sources.append(("pixels", [torch.cat([(x - ckpt.mean_image).flatten(1)
                                                  for x, _ in DataLoader(d, batch_size=512)])
                                       for d in (splits.val, splits.train)]))
        else:
            log.info("pixel baseline skipped: %d values would not fit comfortably in memory", values)
        for source, (q, db) in sources:
            for norm in ("none", "l2"):
                f = l2_normalise if norm == "l2" else (lambda x: x)
                scores = evaluate_retrieval(f(q), q_labels, f(db), db_labels, metric=metric, ks=ks)
                scores.pop("ap")
                result["rows"].append({"features": source, "normalisation": norm, **scores})
                log.debug("%s, %s features, %s: mAP %.4f (chance %.4f), %s", source, norm, metric, scores["map"],
                         scores["chance_map"],
                         ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if k.startswith("precision")))
    if out is not None:
        from cnnkit.utils import ensure_writable_dir, write_json_atomic

        out = ensure_writable_dir(out)
        f = l2_normalise if normalise == "l2" else (lambda x: x)
        shown = torch.linspace(0, len(queries) - 1, min(show, len(queries))).round().long().unique()
        idx = nearest(f(queries[shown]), f(database), show_k, metric)  # (S, k)
        q_imgs = query_images[shown] if images else torch.stack([splits.val[int(i)][0] for i in shown])
        n_imgs = torch.stack([torch.stack([splits.train[int(j)][0] for j in row]) for row in idx])  # (S, k, C, H, W)
        match = None if q_labels is None else db_labels[idx] == q_labels[shown][:, None]
        png = plot_neighbours(out / "neighbours.png", q_imgs, n_imgs, match)
        result["neighbours_png"] = str(png)
        write_json_atomic(out / "retrieval.json", result)
    return result
