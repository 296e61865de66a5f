"""Numbers about networks: per-layer summary (shapes, neurons, parameters, MACs, receptive field)."""

from cnnkit.analysis.summary import Comparison, LayerRow, Reference, Summary, summary

__all__ = ["Comparison", "LayerRow", "Reference", "Summary", "summary"]
