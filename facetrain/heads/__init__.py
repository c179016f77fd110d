"""facetrain.heads: margins, the model-parallel partial-FC classifier and LEAP.

Import the public pieces from their modules (nothing heavy happens at import):
`facetrain.heads.partial_fc.PartialFC`, `facetrain.heads.margins.margin_logits`,
`facetrain.heads.dist_softmax.dist_softmax_cross_entropy`, `facetrain.heads.leap.LeapState`,
`facetrain.heads.partition.class_range`.
"""
from facetrain.heads.partial_fc import PartialFC

__all__ = ["PartialFC"]
