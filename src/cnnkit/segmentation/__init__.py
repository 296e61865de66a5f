"""Pixelwise classification as an application: a patch classifier run densely over whole images.

``data`` reads image/mask pairs as users bring them, ``augment`` transforms an image and its mask
together, ``metrics`` scores predictions; training goes through ``cnnkit.train`` and prediction
through the exact dense conversion in ``cnnkit.dense``.
"""

from cnnkit.segmentation import schema as _schema  # noqa: F401  (registers what its checkpoints hold)
