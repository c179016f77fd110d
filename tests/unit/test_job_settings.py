"""JobSettings: the long-tailed split's folder is tied to the glyph folder it was made from."""
from pathlib import Path

import pytest

from experiments.jobs import JobSettings


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


def test_tail_without_designs_names_its_split_and_writes_the_exclusion(tmp_path):
    from experiments.jobs import write_design_exclusion
    s = JobSettings(glyphs=Path("data/glyphs"), tail_without_designs=("Kouzan", "kiloji"))
    assert s.longtail == Path("data/longtail_H100_Tall_S3_tailwithout_Kouzan-kiloji")
    designs = tmp_path / "train_designs.csv"
    designs.write_text("label,ordinal,design,name\n0,0,0,IPAGothic\n0,1,2,AoyagiKouzanFontT\n"
                       "0,2,10,kiloji\n1,0,0,IPAGothic\n1,1,12,KouzanBrushFontSousyo\n")
    out = tmp_path / "x.csv"
    assert write_design_exclusion(designs, out, ["kouzan", "KILOJI"]) == 3
    assert out.read_text().splitlines() == ["label,ordinal,design,name", "0,1,2,AoyagiKouzanFontT",
                                            "0,2,10,kiloji", "1,1,12,KouzanBrushFontSousyo"]
    with pytest.raises(ValueError, match=r"no design name contains \['seto'\]; designs: "
                                         r"AoyagiKouzanFontT, IPAGothic"):
        write_design_exclusion(designs, out, ["seto"])
    with pytest.raises(FileNotFoundError, match="rebuild the glyph set"):
        write_design_exclusion(tmp_path / "none.csv", out, ["seto"])
