"""The round-4 report and tuning rule on synthetic run folders: paired gains with k/n and
min..max against numbers computed here by hand, the disagreement lines, the one plot, and the
written tuning rule (experiments/round4.py)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import round4, study_report


def write_eval(run: Path, rank1: float, ijbc3: float = 0.97, ijbc4: float = 0.9,
               acc: float = 0.93, vtpr: float = 0.6, name: str = "eval.json") -> None:
    run.mkdir(parents=True, exist_ok=True)
    (run / name).write_text(json.dumps({
        "verification": {"accuracy_mean": acc, "tpr_at_fpr": {"1e-03": vtpr}},
        "ijbc": {"tpr_at_fpr": {"1e-03": ijbc3, "1e-04": ijbc4, "1e-05": None}},
        "megaface": {"rank1": rank1}}))


@pytest.fixture()
def setting(tmp_path) -> Path:
    root = tmp_path / "round4_B"
    base = {0: 0.470, 1: 0.480, 2: 0.460}
    for s, r in base.items():
        write_eval(root / f"cosface_seed{s}", r)
    # leap_full: rank-1 +2.0/+3.0/+1.0 points, verification accuracy -0.5/+0.5/-0.1 (1 of 3)
    for s, (d, a) in enumerate([(0.02, -0.005), (0.03, 0.005), (0.01, -0.001)]):
        write_eval(root / f"leap_full_seed{s}", base[s] + d, acc=0.93 + a)
    # class_balanced: worse on every seed and metric; seed 2 missing (unpaired counts 2)
    for s in (0, 1):
        write_eval(root / f"class_balanced_seed{s}", base[s] - 0.05, ijbc3=0.95, ijbc4=0.85,
                   acc=0.90, vtpr=0.5)
    write_eval(root / "notarun", 0.1)                     # ignored: not <method>_seed<k>
    return root


def test_paired_gains_cells_and_disagreements(setting):
    gains = study_report.paired_gains(study_report.load_results(setting), "cosface")
    rank1 = gains["leap_full"]["megaface_rank1"]
    assert rank1 == pytest.approx({0: 2.0, 1: 3.0, 2: 1.0})
    assert study_report.gain_cell(rank1) == "+2.00 [+1.00..+3.00] (3/3)"
    acc = gains["leap_full"]["verification_acc"]
    assert study_report.gain_cell(acc) == "-0.03 [-0.50..+0.50] (1/3)"
    assert study_report.gain_cell(gains["class_balanced"]["megaface_rank1"]) == \
        "-5.00 [-5.00..-5.00] (0/2)"
    assert study_report.gain_cell({}) == "not run"
    dis = study_report.disagreements(gains)
    assert "class_balanced" not in dis           # worse on every seed on every metric
    assert dis["leap_full"].startswith("better on every seed: MegaFace-style rank-1")
    assert "mixed: Verification accuracy (1/3)" in dis["leap_full"]
    # the other metrics equal the baseline's on every seed: level, not worse
    assert "level on every seed: IJB-C-style TPR@1e-4" in dis["leap_full"]
    assert "worse" not in dis["leap_full"]


def test_markdown_and_the_one_plot(setting, tmp_path):
    import shutil
    other = tmp_path / "round4_H50"
    shutil.copytree(setting, other)
    shutil.rmtree(other / "class_balanced_seed0")
    md, png = tmp_path / "t.md", tmp_path / "img" / "gains.png"
    assert study_report.main([str(setting), str(other), "--md", str(md), "--plot",
                              str(png)]) == 0
    text = md.read_text()
    assert text.count("## ") == len(study_report.METRICS) + 1
    assert "| method | round4_B | round4_H50 |" in text
    assert "| leap_full | +2.00 [+1.00..+3.00] (3/3) | +2.00 [+1.00..+3.00] (3/3) |" in text
    assert "| class_balanced | -5.00 [-5.00..-5.00] (0/2) | -5.00 [-5.00..-5.00] (0/1) |" in text
    assert "- round4_B, leap_full: better on every seed" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_view_reads_only_validation_files(setting, tmp_path):
    for s, r in ((0, 0.5), (1, 0.5)):
        write_eval(setting / f"cosface_seed{s}", r, name="eval_validation.json")
        write_eval(setting / f"leap_full-width3_seed{s}", r + 0.01, name="eval_validation.json")
    res = study_report.load_results(setting, study_report.VALIDATION_EVAL)
    assert sorted(res) == ["cosface", "leap_full-width3"] and sorted(res["cosface"]) == [0, 1]
    (setting / "cosface_seed0" / "eval_validation.json").write_text("{}")
    with pytest.raises(ValueError, match="eval_validation.json: not an evaluation file"):
        study_report.load_results(setting, study_report.VALIDATION_EVAL)


def test_choose_takes_the_best_and_breaks_ties_toward_the_default():
    specs = ("a0", "a1", "a2", "a3")
    assert round4.choose(specs, 2, {"a0": 50.0, "a1": 49.0, "a2": 48.0, "a3": 47.0}) == "a0"
    # a0 is best but a1 is within 0.2 points and nearer the default (index 2)
    assert round4.choose(specs, 2, {"a0": 50.0, "a1": 49.85, "a2": 48.0, "a3": 47.0}) == "a1"
    # the default itself tied with the best: keep the default
    assert round4.choose(specs, 2, {"a0": 50.0, "a1": 49.0, "a2": 49.9, "a3": 49.95}) == "a2"
    # equal distance from the default: the smaller position
    assert round4.choose(specs, 2, {"a0": 0.0, "a1": 50.0, "a2": 40.0, "a3": 50.0}) == "a1"
    with pytest.raises(ValueError, match="no validation score yet for \\['a3'\\]"):
        round4.choose(specs, 2, {"a0": 1.0, "a1": 1.0, "a2": 1.0})


def test_open_width_grid_grows_until_the_peak_is_inside():
    g = next(g for g in round4.GRIDS if g.method == "leap_full")
    scores = {"leap_full": 47.0, "leap_full-width3": 49.0, "leap_full-width10": 51.0,
              "leap_full-width20": 52.0, "leap_full-width40": 53.0}
    assert round4.extend_open_grid(g, scores)[-1] == "leap_full-width80"   # best at the top
    scores["leap_full-width80"] = 52.5                                     # best second from top
    assert round4.extend_open_grid(g, scores)[-1] == "leap_full-width160"
    scores["leap_full-width160"] = 50.0                                    # two below the best
    grid = round4.extend_open_grid(g, scores)
    assert grid[-1] == "leap_full-width160"
    assert round4.choose(grid, g.default, scores) == "leap_full-width40"
    # a grid whose best is inside from the start does not grow
    flat = {s: 50.0 - i for i, s in enumerate(g.specs)}
    assert round4.extend_open_grid(g, flat) == g.specs


def test_choice_and_test_entries():
    scores = {s: 40.0 for g in round4.GRIDS for s in round4.extend_open_grid(g, {})}
    scores.update({"cosface": 40.0, "adaface": 41.0, "curricularface": 40.5,
                   "elasticface_cos-sigma0.2": 42.0, "leap_full-width40": 30.0})
    # leap's and uniform's widths all score 40 except width 40: best inside, no growth
    choice = round4.make_choice(scores)
    assert choice["tuned"]["elasticface_cos"] == "elasticface_cos-sigma0.2"
    assert choice["tuned"]["class_balanced"] == "class_balanced"          # all tied: default
    assert choice["best_margin_head"] == "elasticface_cos-sigma0.2"
    entries = round4.test_specs(choice)
    assert entries[:len(round4.DEFAULT_METHODS)] == list(round4.DEFAULT_METHODS)
    assert entries[-1] == "leap_full+elasticface_cos-sigma0.2"
    from experiments.jobs import method_overrides
    for spec in entries + round4.tuning_specs(scores):
        method_overrides(spec)                            # every entry is a valid --methods


def test_pick_is_frozen_and_test_waits_for_it(tmp_path, monkeypatch, capsys):
    b, h = tmp_path / "round4_B", tmp_path / "round4_H50"
    monkeypatch.setattr(round4, "SETTINGS", {"B": ("--out", str(b)),
                                             "H50": ("--out", str(h), "--head", "50")})
    monkeypatch.setattr(round4, "ARCHIVE", tmp_path / "archive")
    with pytest.raises(SystemExit, match="run `tune` and `pick` first"):
        round4.run_test(dry=True)
    specs = round4.tuning_specs({})
    for i, spec in enumerate(specs):
        write_eval(b / f"{spec}_seed0", 0.50 - 0.001 * i, name="eval_validation.json")
    choice = round4.run_pick()
    assert json.loads((b / "tuning.json").read_text()) == choice
    # better scores arriving later do not change a written choice
    write_eval(b / "class_balanced-beta0.5_seed0", 0.99, name="eval_validation.json")
    assert round4.run_pick() == choice and "the choice is frozen" in capsys.readouterr().out
    round4.run_test(dry=True)
    out = capsys.readouterr().out.splitlines()
    # one main-job call per (setting, seed): B's seeds, then H50's
    assert len(out) == 6 and all("--eval-on test" in c for c in out)
    assert [c.split("--seeds ")[1].split()[0] for c in out] == ["0", "1", "2"] * 2
    assert all(f"--out {b} " in c for c in out[:3]) and all(f"--out {h} --head 50" in c
                                                            for c in out[3:])
    assert all("," + choice["leap_on_top"] + " " in c for c in out)


def test_finished_groups_are_skipped_and_archived_results_count(tmp_path, monkeypatch, capsys):
    """A (setting, seed) group whose runs all have test results, in runs/ or in the archive,
    is not run again; a group with one missing run runs that run with the baseline only."""
    b, h, arc = tmp_path / "round4_B", tmp_path / "round4_H50", tmp_path / "archive"
    monkeypatch.setattr(round4, "SETTINGS", {"B": ("--out", str(b)),
                                             "H50": ("--out", str(h), "--head", "50")})
    monkeypatch.setattr(round4, "ARCHIVE", arc)
    monkeypatch.setattr(round4, "TEST_SEEDS", (0, 1))
    specs = ["cosface", "leap_full", "adaface"]
    for m in specs:
        write_eval(b / f"{m}_seed0", 0.5)              # B seed 0: done in runs/
        write_eval(arc / "B" / f"{m}_seed1", 0.5)      # B seed 1: done in the archive only
        write_eval(h / f"{m}_seed1", 0.5)
    (h / "adaface_seed1" / "eval.json").unlink()       # H50 seed 1: adaface missing
    groups = round4.test_groups(specs)
    assert groups == [("H50", 0, specs), ("H50", 1, ["cosface", "adaface"])]
    assert round4.is_done("B", "leap_full", 1) and not round4.is_done("H50", "adaface", 1)
    # B seed 1 came from another CPU and is complete: it counts. Once one of its runs is
    # missing, the half-done group is run again whole on this machine.
    for m in specs:
        (arc / "B" / f"{m}_seed1" / "run.json").write_text(json.dumps({"cpu": "another CPU"}))
    assert round4.test_groups(specs)[0] == ("H50", 0, specs)
    (arc / "B" / "adaface_seed1" / "eval.json").unlink()
    assert round4.test_groups(specs)[0] == ("B", 1, specs)


def test_archive_copies_results_with_their_origin_and_report_reads_it(tmp_path, monkeypatch,
                                                                     capsys):
    b, arc, glyphs = tmp_path / "round4_B", tmp_path / "archive", tmp_path / "glyphs"
    monkeypatch.setattr(round4, "SETTINGS", {"B": ("--out", str(b))})
    monkeypatch.setattr(round4, "ARCHIVE", arc)
    glyphs.mkdir()
    (glyphs / "manifest.json").write_text('{"settings": {}}')
    write_eval(b / "cosface_seed0", 0.47)
    write_eval(b / "cosface_seed0", 0.45, name="eval_validation.json")
    write_eval(b / "leap_full_seed0", 0.49)
    (b / "leap_full_seed0" / "export").mkdir()
    (b / "leap_full_seed0" / "export" / "backbone.pt").write_bytes(b"model")
    choice = round4.make_choice({spec: 40.0 for spec in round4.tuning_specs({})})
    (b / "tuning.json").write_text(json.dumps(choice))
    assert round4.archive(glyphs) == 2
    assert sorted(p.relative_to(arc).as_posix() for p in arc.rglob("*") if p.is_file()) == [
        "B/cosface_seed0/eval.json", "B/cosface_seed0/eval_validation.json",
        "B/cosface_seed0/run.json", "B/leap_full_seed0/eval.json", "B/leap_full_seed0/run.json",
        "B/tuning.json"]                                # results only: no model file
    origin = json.loads((arc / "B/leap_full_seed0/run.json").read_text())
    assert origin["cpu"] == round4._cpu_model() and len(origin["data_manifest_sha256"]) == 64
    assert round4.archive(glyphs) == 0                  # nothing new
    assert round4.archive(tmp_path / "no_build") == 0   # nothing new: no data build needed
    # runs/ gone (another machine): the archive keeps the results, the tuning scores and the choice
    import shutil
    shutil.rmtree(b)
    assert round4.is_done("B", "leap_full", 0)
    assert round4._tune_scores() == {"cosface": pytest.approx(45.0)}
    assert round4._choice_path().is_file()              # restored from the archive
    # runs of one setting from two CPUs: the report says so
    other = json.loads((arc / "B/cosface_seed0/run.json").read_text())
    other["cpu"] = "another CPU"
    (arc / "B/cosface_seed0/run.json").write_text(json.dumps(other))
    assert len(round4.origins(arc / "B")) == 2
    monkeypatch.setattr(round4, "GLYPHS", glyphs)
    monkeypatch.setattr(round4, "REPO", tmp_path)
    round4.report()
    err = capsys.readouterr().err
    assert "setting B has runs from 2 machines or data builds" in err
    text = (tmp_path / "docs/study/round4_tables.md").read_text()
    assert "| MegaFace-style rank-1 | 47.00 [47.00..47.00] (1) |" in text    # the baseline
    assert "## Tuning on the validation characters" in text
    assert (tmp_path / "docs/study/img/round4_gains.png").is_file()


def test_tuning_table_marks_the_choice_and_the_default():
    specs = round4.tuning_specs({})
    scores = {spec: 40.0 for spec in specs}
    scores.update({"class_balanced-beta0.9": 41.0, "adaface": 42.5})
    text = round4.tuning_markdown(round4.make_choice(scores))
    row = next(line for line in text.splitlines() if line.startswith("| class_balanced |"))
    assert row == ("| class_balanced | beta0.5: 40.00, **beta0.9: 41.00**, default (d): 40.00, "
                   "beta0.999: 40.00 | class_balanced-beta0.9 |")
    assert "Best: adaface, so the LEAP-on-top entry is leap_full+adaface" in text


def test_contrasts_are_paired_per_seed():
    res = {"B": {"a": {0: {"megaface_rank1": 0.50}, 1: {"megaface_rank1": 0.47}},
                 "b": {0: {"megaface_rank1": 0.48}, 1: {"megaface_rank1": 0.48},
                       2: {"megaface_rank1": 0.10}}}}
    text = round4.contrast_markdown(res, [("a", "b"), ("a", "missing")])
    # seed 2 has no `a`: not paired; +2.00 and -1.00 points
    assert "| B | a − b | +0.50 [-1.00..+2.00] (1/2) | not run |" in text
    assert "missing" not in text
    choice = round4.make_choice({spec: 40.0 for spec in round4.tuning_specs({})})
    assert round4.contrasts(choice)[0] == (choice["leap_on_top"], choice["best_margin_head"])
