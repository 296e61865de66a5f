"""The lecture's experiments, one section each (``build(out, *, quick, seed, progress) -> Section``):

    relu_tanh        "Choice of activation function": ReLU vs tanh, epochs to 25% training error
    direct_maps      "Directly predict segmentation maps": a direct-map net vs a dense patch classifier, objects moved
    strided_fcn      "Down-sampling due to greater-than-1 strides" vs the exact dense (d-regularly sparse) output
    stride1_pooling  "Pooling without downsampling": invariance vs information loss

Each lives in its own module (``exp_*``); "direct_maps" and "strided_fcn" share the shapes data and
the patch classifier of ``exp_shapes`` (the second to run reuses the first's run folder in ``out``).
"""

from cnnkit.lecture.exp_direct_maps import build as direct_maps
from cnnkit.lecture.exp_relu_tanh import build as relu_tanh
from cnnkit.lecture.exp_stride1_pooling import build as stride1_pooling
from cnnkit.lecture.exp_strided_fcn import build as strided_fcn

__all__ = ["direct_maps", "relu_tanh", "stride1_pooling", "strided_fcn"]
