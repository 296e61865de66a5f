"""Exact pixelwise classification (Li, Zhao and Wang, arXiv:1412.4526; the lecture's last part).

    densify(model, patch_size)               patch classifier -> dense network, forward and backward
    patch_by_patch(model, image, patch_size) the slow twin, for checking and benchmarking
    dense_loss(scores, target, mask)         the paper's masked pixelwise loss
    export_onnx(dense, "dense.onnx")         the dense net as ONNX (dynamic batch, H, W; border inside)
"""

from cnnkit.dense.baseline import patch_by_patch
from cnnkit.dense.export import ExportError, export_onnx
from cnnkit.dense.loss import dense_loss
from cnnkit.dense.net import DenseNet, densify
from cnnkit.dense.rules import register_function, register_method, register_module
from cnnkit.dense.tiling import pad_image, patch_span

__all__ = ["DenseNet", "densify", "patch_by_patch", "dense_loss", "pad_image", "patch_span",
           "register_module", "register_function", "register_method", "export_onnx", "ExportError"]
