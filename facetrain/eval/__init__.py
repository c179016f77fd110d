"""facetrain.eval."""
