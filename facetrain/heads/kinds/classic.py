"""CosFace (m_cos), ArcFace (m_arc) and InsightFace's combined margin: `MarginKind` itself.

Their arithmetic lives in facetrain/heads/margins.py (target_cos) and is the default path of
every run; registering the base class keeps it bit for bit what it was before the registry.
"""
from facetrain.heads.kinds import register
from facetrain.heads.margins import MarginKind

for _name in ("cosface", "arcface", "combined"):
    register(_name)(MarginKind)
