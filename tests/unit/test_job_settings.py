"""JobSettings: the long-tailed split's folder is tied to the glyph folder it was made from."""
from pathlib import Path

import pytest

from facetrain.experiment import JobSettings


def test_default_split_shares_make_longtail_default_name():
    s = JobSettings(glyphs=Path("data/glyphs"), head=100, tail_samples=3)
    assert s.longtail == Path("data/longtail_H100_Tall_S3")


def test_other_glyph_folder_gets_its_own_split():
    # A second dataset (e.g. held-out designs) must never reuse the default dataset's split.
    s = JobSettings(glyphs=Path("data/glyphs_holdout"), head=100, tail=500, tail_samples=2)
    assert s.longtail == Path("data/glyphs_holdout_longtail_H100_T500_S2")


def test_unknown_method_and_missing_baseline_are_errors():
    with pytest.raises(ValueError, match="unknown method"):
        JobSettings(methods=("cosface", "leap_ful"))
    with pytest.raises(ValueError, match="baseline"):
        JobSettings(methods=("leap_full",))
