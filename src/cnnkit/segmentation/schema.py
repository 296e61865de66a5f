"""What a segmentation checkpoint stores beyond the runner's fields (``SegmentationTask``'s meta, read
again by prediction), registered with :mod:`cnnkit.train.checkpoint_schema` when this package is imported."""

from __future__ import annotations

from cnnkit.train.checkpoint_schema import (
    BOOL,
    CONFIG_SPECIAL,
    MAX_SIDE,
    NON_NEGATIVE,
    OBJECT,
    STRING,
    Rule,
    TaskSchema,
    _int,
    _int_in,
    _number,
    one_of,
    optional,
    register_task_schema,
)


def _segment_meta() -> dict[str, Rule]:
    """What ``cnnkit segment train`` stores (``SegmentationTask._meta``) and prediction reads."""
    from cnnkit.dense.tiling import BORDERS
    from cnnkit.segmentation.data import MASK_MODES

    return {
        "patch": Rule(f"a [height, width] list of two integers in 1..{MAX_SIDE} (three, [depth, height, width], "
                      "for a 3D net)",
                      lambda v: isinstance(v, list) and len(v) in (2, 3) and all(_int(x) and 1 <= x <= MAX_SIDE
                                                                                 for x in v)),
        "border": one_of(list(BORDERS)),
        "preprocess": OBJECT,
        "threshold": optional(Rule("a number in [0, 1]", lambda v: _number(v) and 0 <= v <= 1)),
        "positive_class": NON_NEGATIVE,
        "palette": optional(CONFIG_SPECIAL["palette"]),
        "ignore_value": optional(_int_in(0, 65535)),  # a mask file's value: 8 or 16 bits
        "mask_mode": one_of(MASK_MODES),
        "valid_region": BOOL,
        "symmetries": Rule("a non-empty list of integers in 0..7",
                           lambda v: isinstance(v, list) and len(v) > 0 and all(_int(k) and 0 <= k <= 7 for k in v)),
        "layouts": Rule("an object of strings", lambda v: isinstance(v, dict) and all(map(STRING.ok, v.values()))),
        # null: 2D images; else {"mode", "context"}, checked as a section (_volume)
        "volume": optional(Rule("an object", lambda v: isinstance(v, dict) and {"mode", "context"} <= set(v))),
    }


def _preprocess() -> dict[str, Rule]:
    from cnnkit.segmentation.augment import CONTRAST_MODES, NORMALIZE_MODES

    return {"normalize": one_of(NORMALIZE_MODES), "contrast": one_of(CONTRAST_MODES)}


def _volume() -> dict[str, Rule]:
    """``--volume``: the mode, and the neighbouring slices a side that 2.5D stacks (0 in 3D)."""
    from cnnkit.segmentation.volume import VOLUME_MODES

    return {"mode": one_of(VOLUME_MODES), "context": _int_in(0, 64)}


def _sections() -> dict[str, dict[str, Rule]]:
    return {"preprocess": _preprocess(), "volume": _volume()}


def _config() -> type:
    from cnnkit.segmentation.task import SegmentConfig

    return SegmentConfig


register_task_schema("segment", TaskSchema(meta=_segment_meta, sections=_sections, config=_config))
