"""facetrain.heads."""
