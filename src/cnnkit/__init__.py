"""cnnkit: the lecture "Convolutional Neural Network" (X. Wang, 2015) as fast PyTorch software.

Parts (one hop from a lecture concept to its code; see the README's map):
    cnnkit.layers    the lecture's layers (locally connected, LCN, LRN, pooling variants, FFT conv)
    cnnkit.backprop  the sensitivity equations in NumPy (slow, obvious twin of autograd)
    cnnkit.models    LeNet-5 ... GoogLeNet, by name through a registry
    cnnkit.analysis  summary: shapes, neurons, parameters, MACs, receptive field
    cnnkit.dense     exact pixelwise classification (FC->conv, d-regularly sparse kernels)
    cnnkit.data      datasets and augmentations
    cnnkit.train     engine, checkpoints, metrics
"""

from cnnkit.errors import CnnkitError

__version__ = "0.1.0"
__all__ = ["CnnkitError", "__version__"]
