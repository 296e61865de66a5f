"""The sections that redraw the lecture's figures from cnnkit's own code, one function per section key.

Each is a ``build(out, *, quick, seed, progress) -> Section`` (the contract in
:mod:`cnnkit.lecture.section`): figures are written into ``out`` with the key as their prefix, training
runs go under ``out/runs/<key>/``. Where each lives:

- ``fig_dense``: d-regularly sparse kernels, the toy example (``cnnkit.dense``);
- ``fig_geometry``: receptive fields (``analysis.summary``), learned invariance (``layers.ChannelMaxPool``);
- ``fig_frequency``: equivariance (``analysis.equivariance``), FFT convolution (``layers.fft_conv``);
- ``fig_filters``: 96 first-layer filters (``runner.fit``, ``analysis.visualize``);
- ``fig_studies``: transfer, retrieval and the components study (``analysis.transfer``, ``.retrieval``,
  ``.ablate``).
"""

from __future__ import annotations

from cnnkit.lecture.fig_dense import build_sparse_kernels as sparse_kernels
from cnnkit.lecture.fig_dense import build_toy_example as toy_example
from cnnkit.lecture.fig_filters import build_filters as filters
from cnnkit.lecture.fig_frequency import build_equivariance as equivariance
from cnnkit.lecture.fig_frequency import build_fft as fft
from cnnkit.lecture.fig_geometry import build_learned_invariance as learned_invariance
from cnnkit.lecture.fig_geometry import build_receptive_fields as receptive_fields
from cnnkit.lecture.fig_studies import build_studies as studies

# in the order the lecture reaches them
FIGURE_SECTIONS = {
    "receptive_fields": receptive_fields,      # "A hidden unit ... is influenced by a larger neighborhood"
    "equivariance": equivariance,              # "Is convolution equivariant to changes in the scale or rotation?"
    "fft": fft,                                # "Can we apply CNN in frequency domain?"
    "learned_invariance": learned_invariance,  # "Example of learned invariances"
    "filters": filters,                        # "96 learned low-level filters"
    "studies": studies,                        # retrieval, transfer, components of CNNs
    "sparse_kernels": sparse_kernels,          # "d-regularly convolution and pooling kernels"
    "toy_example": toy_example,                # "A toy example"
}

__all__ = ["FIGURE_SECTIONS", *FIGURE_SECTIONS]
