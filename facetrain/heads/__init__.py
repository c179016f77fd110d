"""facetrain.heads: margins, the model-parallel partial-FC classifier and LEAP.

Modules, lowest first (no import cycles): fused (compiled elementwise kernels), noise (keyed
Gaussian angles), margins, feature_cloud (LEAP's perturbation of a logit block), partition
(class blocks, label routing, resharding), leap_controls, leap (LeapState), dist_softmax,
kinds (the margin kinds by name, one file each, on top of margins), partial_fc (PartialFC,
which drives all of them).

Importing this package imports PartialFC, and with it torch and every module above; the public
pieces live in their modules: `facetrain.heads.partial_fc.PartialFC`, `facetrain.heads.margins.margin_logits`,
`facetrain.heads.feature_cloud.Cloud`,
`facetrain.heads.dist_softmax.dist_softmax_cross_entropy`, `facetrain.heads.leap.LeapState`,
`facetrain.heads.partition.class_range`.
"""
from facetrain.heads.partial_fc import PartialFC

__all__ = ["PartialFC"]
