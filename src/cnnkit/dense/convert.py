"""Walk a patch classifier's graph and build its dense twin (Algorithm 1 of the lecture).

Li, Zhao and Wang (arXiv:1412.4526): set every stride to 1, replace each conv/pool kernel by its
d-regularly sparse version (dilation ``d``), and multiply ``d`` by the layer's stride afterwards;
a fully connected layer reading a C x M x M map becomes a C x M x M convolution dilated by ``d``.

Correspondence used throughout: a node of the patch net with spatial size ``S`` and accumulated
stride ``d`` becomes a dense map ``D`` with ``D[u] = node(patch starting at u - d t)[t]``. Without
padding inside the net every unit's receptive field starts at ``d t`` in its patch, so this is
well defined, and every dense op is a "valid" stride-1 op. ``Info`` is what the patch net holds
at a node (read off one run on a patch-sized input); ``Step`` is what the dense net does there.
Info, the Steps and the Converter live in :mod:`cnnkit.dense.graph`, the per-type rules in
:mod:`cnnkit.dense.rules` (filled by ``rules_window``, ``rules_pointwise``, ``rules_slicing``
and ``rules_cnnkit``).
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx
from torch import nn

# importing the rule files fills the rule tables that convert_node dispatches on
from cnnkit.dense import rules_cnnkit, rules_pointwise, rules_slicing, rules_window  # noqa: F401
from cnnkit.dense.graph import Converter, Info, PointwiseStep, SpatialStep, Value
from cnnkit.dense.ops import Factors, LayoutChooser, exact_pointwise, prod
from cnnkit.dense.rules import MODULE_RULES, convert_node
from cnnkit.errors import UnsupportedLayerError

log = logging.getLogger(__name__)


def convert(model: nn.Module, patch: Factors, in_channels: int | None, exact: bool,
            device: torch.device, dtype: torch.dtype) -> tuple[Converter, list, str, Info]:
    """Trace ``model``, run it once on a patch, and build one Step per graph node."""
    cv = Converter(model, patch, exact)
    cv.trace(tuple(MODULE_RULES))
    if in_channels is None:
        in_channels = cv.guess_in_channels()
    cv.in_channels = in_channels
    cv.run_patch_net(in_channels, device, dtype)
    steps = []
    output_name, output_info = None, None
    placeholders = [n for n in cv.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedLayerError(f"model forward takes {len(placeholders)} inputs; densify needs one")
    for node in cv.graph.nodes:
        if node.op == "placeholder":
            cv.infos[node.name] = Info("map", in_channels, patch, (1,) * cv.nd, (0,) * cv.nd)
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or not cv.infos[out.name].is_dense:
                raise UnsupportedLayerError("model output must be one tensor of class scores per patch")
            info = cv.infos[out.name]
            if any(s != 1 for s in info.spatial):
                raise UnsupportedLayerError(
                    f"model output for one patch has spatial size {info.spatial}, not one score vector: "
                    "the patch size does not match the network (choose the size it was built for)")
            output_name, output_info = out.name, info
            continue
        step, info = convert_node(cv, node)
        cv.infos[node.name] = info
        if isinstance(step, SpatialStep):
            step.out_ext, step.patch_positions = info.ext, prod(info.spatial)
        steps.append((node, step))
    return cv, steps, output_name, output_info


class DenseCore(nn.Module):
    """The converted graph: ``(N, C, *L) -> (N, K, *(L - ext))``, any ``L`` > ext."""

    def __init__(self, model: nn.Module, steps: list, input_name: str, output: str, chooser: LayoutChooser):
        super().__init__()
        self.model = model  # registered: parameters() and state_dict() are the patch net's own
        self.steps = steps
        self.input_name, self.output = input_name, output
        self.chooser = chooser
        for _, s in steps:
            if isinstance(s, SpatialStep):
                s.chooser = chooser
        # maps are freed right after their last reader: peak memory is what limits the image size
        last_use: dict[str, int] = {}
        for i, (node, _) in enumerate(steps):
            for inp in node.all_input_nodes:
                last_use[inp.name] = i
        self._free = [[n for n, i in last_use.items() if i == k and n != output] for k in range(len(steps))]
        # steps that may overwrite their only input: it is an intermediate map read by them alone
        self._sole = [len(node.all_input_nodes) == 1 and node.all_input_nodes[0].name in self._free[k]
                      and node.all_input_nodes[0].name != input_name and isinstance(step, PointwiseStep)
                      and step.inplace is not None for k, (node, step) in enumerate(steps)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        env: dict[str, object] = {self.input_name: Value(x)}
        grad = torch.is_grad_enabled()
        for (node, step), free, sole in zip(self.steps, self._free, self._sole):
            if sole and not grad and not exact_pointwise(x) and self._unshared(env, node, x):
                env[node.name] = step.run_inplace(env[node.all_input_nodes[0].name])
            else:
                args = fx.node.map_arg(node.args, lambda n: env[n.name])
                kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n.name])
                env[node.name] = step(*args, **kwargs)
            for name in free:
                del env[name]
        return env[self.output].dense()

    @staticmethod
    def _unshared(env: dict, node: fx.Node, x: torch.Tensor) -> bool:
        """Nothing else alive (the image, another map: views after flatten, slicing or split) shares the
        storage of the map an in-place step would overwrite."""
        name = node.all_input_nodes[0].name
        ptr = env[name].t.untyped_storage().data_ptr()
        alive = [v for k, v in env.items() if k != name]
        alive += [p for v in alive if isinstance(v, tuple) for p in v]  # the parts of a split
        others = [v.t for v in alive if isinstance(v, Value)] + [x]
        return all(t.untyped_storage().data_ptr() != ptr for t in others)
