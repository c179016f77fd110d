"""facetrain: distributed long-tailed face recognition training with LEAP.

Nothing runs at import: no process group, no logging setup, no argument parsing.
"""

__version__ = "0.1.0"
