"""The eval CLIs as users run them (subprocess), on tiny protocol folders in the exact formats:
--features runs checked against the library, a no-argument run on the default locations with a
TorchScript model, and bad input that must name the file and line."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "unit"))
sys.path.insert(0, str(REPO / "eval_protocols"))      # as `python eval_protocols/x.py` has it
from test_eval_builders import (make_ijbc, make_megaface, make_pack, make_reid,  # noqa: E402
                                subject_features)


def inproc(name, *args, capsys=None):
    """Run a CLI's main in this process (cheap: torch is already imported); -> (rc, out, err)."""
    import importlib
    import _common
    mod = importlib.import_module(name)
    rc = _common.run(mod.main, [*args, "--quiet"], mod.build_parser)
    out, err = capsys.readouterr()
    return rc, out, err


def cli(name, *args, cwd=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(REPO / "eval_protocols" / f"{name}.py"), *args,
                           "--quiet"], cwd=cwd or REPO, env=env, capture_output=True, text=True,
                          timeout=120)


class MeanNet(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.mean((2, 3)), x.std((2, 3)), x[..., :4].mean((2, 3))], 1)


def test_no_arguments_uses_defaults_or_says_what_is_missing(tmp_path, capsys, monkeypatch):
    r = cli("lfw", cwd=tmp_path)
    assert r.returncode == 2
    assert "data/glyphs/eval/verification.bin" in r.stderr and "--pack" in r.stderr
    # put a pack and a model where the defaults look: the bare command now works
    (tmp_path / "data/glyphs/eval").mkdir(parents=True)
    make_pack(tmp_path / "data/glyphs/eval/verification.bin", 20, np.random.default_rng(0))
    monkeypatch.chdir(tmp_path)
    rc, _, err = inproc("lfw", capsys=capsys)
    assert rc == 2 and "runs/**/export/backbone.pt" in err and "--model" in err
    (tmp_path / "runs/a/export").mkdir(parents=True)
    torch.jit.script(MeanNet()).save(str(tmp_path / "runs/a/export/backbone.pt"))
    r = cli("lfw", "--image-size", "16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "verification" in r.stdout and "TPR@FPR=1e-03" in r.stdout
    rep = json.loads((tmp_path / "runs/eval/verification.json").read_text())
    assert rep["verification"]["pairs"] == 20
    assert (tmp_path / "runs/eval/verification.png").stat().st_size > 1000
    assert "newest of 1 exported backbone(s)" in r.stderr and "runs/a/export" in r.stderr
    # the main job's exports (runs/main/<method>_seed<k>/export/) count too: the newest wins
    main = tmp_path / "runs/main/cosface_seed0/export/backbone.pt"
    main.parent.mkdir(parents=True)
    torch.jit.script(MeanNet()).save(str(main))
    os.utime(tmp_path / "runs/a/export/backbone.pt", (1000, 1000))
    rc, _, err = inproc("lfw", "--image-size", "16", capsys=capsys)
    assert rc == 0, err
    assert f"newest of 2 exported backbone(s) under runs/: {main.relative_to(tmp_path)}" in err


def test_lfw_features_match_library(tmp_path, capsys):
    from facetrain.eval.verification import evaluate_pack_features
    rng = np.random.default_rng(1)
    issame = make_pack(tmp_path / "lfw.bin", 40, rng)
    feats = rng.normal(size=(80, 8)).astype(np.float32)
    np.save(tmp_path / "f.npy", feats)
    r = cli("lfw", "--pack", str(tmp_path / "lfw.bin"), "--features", str(tmp_path / "f.npy"),
            "--json", str(tmp_path / "r.json"), "--no-plot")
    assert r.returncode == 0, r.stderr
    got = json.loads((tmp_path / "r.json").read_text())["lfw"]
    ref = evaluate_pack_features(feats, issame)
    assert got["accuracy_mean"] == pytest.approx(ref["accuracy_mean"])
    np.save(tmp_path / "short.npy", feats[:-2])
    rc, _, err = inproc("lfw", "--pack", str(tmp_path / "lfw.bin"), "--features",
                        str(tmp_path / "short.npy"), capsys=capsys)
    assert rc == 2 and "78 feature rows" in err and "80 images" in err


def test_ijbc_features_1to1_and_1toN(tmp_path, capsys):
    rng = np.random.default_rng(2)
    info = make_ijbc(tmp_path / "IJBC", rng, n_subjects=6, with_1n=True)
    np.save(tmp_path / "f.npy", subject_features(rng, info["subjects"], noise=0.3))
    r = cli("ijbc", "--root", str(tmp_path / "IJBC"), "--features", str(tmp_path / "f.npy"),
            "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert set(rep["1:1"]["tpr_at_fpr"]) == {"1e-06", "1e-05", "1e-04", "1e-03", "1e-02", "1e-01"}
    assert rep["1:N"]["mean"]["rank1"] > 0.5
    assert "IJBC 1:N" in r.stdout and (tmp_path / "r.png").is_file()
    lmk = tmp_path / "IJBC/meta/ijbc_name_5pts_score.txt"
    lines = lmk.read_text().splitlines()
    lines[1] = " ".join(lines[1].split()[:-2])
    lmk.write_text("\n".join(lines) + "\n")
    rc, _, err = inproc("ijbc", "--root", str(tmp_path / "IJBC"), "--faceness", "--features",
                        str(tmp_path / "f.npy"), capsys=capsys)
    assert rc == 2 and "ijbc_name_5pts_score.txt:2: expected 12 fields" in err


def test_ijbc_model_path_aligns_images(tmp_path, capsys):
    make_ijbc(tmp_path / "IJBC", np.random.default_rng(3), n_subjects=3, templates_per=2,
              with_images=True)
    torch.jit.script(MeanNet()).save(str(tmp_path / "m.pt"))
    rc, _, err = inproc("ijbc", "--root", str(tmp_path / "IJBC"), "--model",
                        str(tmp_path / "m.pt"), "--json", str(tmp_path / "r.json"), "--no-plot",
                        "--save-features", str(tmp_path / "f.npy"), capsys=capsys)
    assert rc == 0, err
    n_img = len((tmp_path / "IJBC/meta/ijbc_face_tid_mid.txt").read_text().splitlines())
    assert np.load(tmp_path / "f.npy").shape == (n_img, 9)


def test_megaface_features_and_devkit_files(tmp_path, capsys):
    rng = np.random.default_rng(4)
    info = make_megaface(tmp_path / "mf", rng, n_ids=4, per_id=3, n_distractors=30)
    feats = np.r_[subject_features(rng, info["ids"], noise=0.5),
                  rng.normal(size=(30, 16)).astype(np.float32)]
    np.save(tmp_path / "f.npy", feats)
    r = cli("megaface", "--root", str(tmp_path / "mf"), "--features", str(tmp_path / "f.npy"),
            "--distractors", "20", "--devkit-out", str(tmp_path / "dk"), "--algo", "ft",
            "--json", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["distractors"] == 20 and rep["probes"] == 12 and "1e-06" in rep["tpr_at_fpr"]
    raw = (tmp_path / "dk/facescrub" / f"{info['probes'][0]}_ft.bin").read_bytes()
    assert raw[:16] == np.array([16, 1, 4, 5], "<i4").tobytes() and len(raw) == 16 + 64
    rc, _, err = inproc("megaface", "--root", str(tmp_path / "mf"), "--features",
                        str(tmp_path / "f.npy"), "--distractors", "31", capsys=capsys)
    assert rc == 2 and "--distractors 31" in err
    # A distractor list entry that climbs out of --devkit-out: refused with file and line
    # before extraction; nothing is written.
    lst = tmp_path / "mf" / "megaface_lst"
    lines = lst.read_text().splitlines()
    lines[4] = "../../../escaped/x.png"
    lst.write_text("\n".join(lines) + "\n")
    rc, _, err = inproc("megaface", "--root", str(tmp_path / "mf"), "--features",
                        str(tmp_path / "f.npy"), "--devkit-out", str(tmp_path / "dk2"),
                        "--algo", "ft", capsys=capsys)
    assert rc == 2 and f"error: {lst}:5: entry '../../../escaped/x.png_ft.bin' has a '..' " \
        "component" in err, err
    assert not (tmp_path / "dk2").exists() and not (tmp_path / "escaped").exists()


def test_megaface_and_reid_model_path_with_a_bad_image(tmp_path, capsys):
    rng = np.random.default_rng(5)
    make_megaface(tmp_path / "mf", rng, n_ids=3, per_id=2, n_distractors=5, with_images=True)
    make_reid(tmp_path / "market", rng, n_ids=3, n_cams=2)
    torch.jit.script(MeanNet()).save(str(tmp_path / "m.pt"))
    rc, out, err = inproc("reid", "--root", str(tmp_path / "market"), "--model",
                          str(tmp_path / "m.pt"), "--image-size", "16", "8", "--json",
                          str(tmp_path / "r.json"), capsys=capsys)
    assert rc == 0, err
    assert "mAP %" in out and (tmp_path / "r.png").is_file()
    rep = json.loads((tmp_path / "r.json").read_text())
    assert 0 <= rep["mAP"] <= 1 and rep["queries_scored"] == 6
    bad = tmp_path / "mf/megaface_images" / (tmp_path / "mf/megaface_lst").read_text().split()[2]
    bad.write_bytes(b"not a png")
    rc, _, err = inproc("megaface", "--root", str(tmp_path / "mf"), "--model",
                        str(tmp_path / "m.pt"), capsys=capsys)
    assert rc == 2 and "(line 3 of" in err and "megaface_lst" in err
    bad.unlink()                                    # missing: found before any extraction
    rc, _, err = inproc("megaface", "--root", str(tmp_path / "mf"), "--model",
                        str(tmp_path / "m.pt"), capsys=capsys)
    assert rc == 2 and "(line 3 of" in err and "1 listed images are missing" in err


def test_trainer_export_is_loaded_at_its_own_input_size(tmp_path, capsys):
    """The trainer's real export (registry backbone + export_backbone): no --image-size needed,
    the export's kwargs give the input side (a 16-px tiny net fails at the default 112)."""
    from facetrain.export import export_backbone
    from facetrain.eval.verification import evaluate_pack_features, load_pack, PackImages
    from facetrain.eval.embed import extract_features
    from facetrain.models.registry import build_backbone
    kwargs = {"embedding_size": 8, "dropout": 0.0, "image_size": 16}
    torch.manual_seed(0)
    model = build_backbone("tiny", **kwargs).eval()
    paths = export_backbone(model, "tiny", kwargs, tmp_path / "export", image_size=16, onnx=False)
    make_pack(tmp_path / "p.bin", 10, np.random.default_rng(6))
    rc, out, err = inproc("lfw", "--pack", str(tmp_path / "p.bin"), "--model", str(paths["torch"]),
                          "--json", str(tmp_path / "r.json"), "--no-plot", capsys=capsys)
    assert rc == 0, err
    bins, issame = load_pack(tmp_path / "p.bin")
    ref = evaluate_pack_features(extract_features(model, PackImages(bins, "p"), image_size=16,
                                                  progress=False), issame)
    got = json.loads((tmp_path / "r.json").read_text())["p"]
    assert got["accuracy_mean"] == pytest.approx(ref["accuracy_mean"])


def test_onnx_model_gives_the_pytorch_features(tmp_path, capsys):
    """--model backbone.onnx runs in onnxruntime at the graph's input size (no --image-size) and
    gives the features of --model backbone.pt."""
    from facetrain.export import export_backbone
    from facetrain.models.registry import build_backbone
    kwargs = {"embedding_size": 8, "dropout": 0.0, "image_size": 16}
    torch.manual_seed(0)
    model = build_backbone("tiny", **kwargs).eval()
    paths = export_backbone(model, "tiny", kwargs, tmp_path / "export", image_size=16)
    make_pack(tmp_path / "p.bin", 10, np.random.default_rng(7))
    feats = {}
    for kind in ("torch", "onnx"):
        rc, _, err = inproc("lfw", "--pack", str(tmp_path / "p.bin"), "--model",
                            str(paths[kind]), "--json", str(tmp_path / f"{kind}.json"),
                            "--no-plot", "--save-features", str(tmp_path / f"{kind}.npy"),
                            capsys=capsys)
        assert rc == 0, err
        assert f"model: {paths[kind]} (input 16)" in err
        feats[kind] = np.load(tmp_path / f"{kind}.npy")
    np.testing.assert_allclose(feats["onnx"], feats["torch"], rtol=1e-4, atol=1e-5)
    rc, _, err = inproc("lfw", "--pack", str(tmp_path / "p.bin"), "--model",
                        str(tmp_path / "missing.onnx"), capsys=capsys)
    assert rc == 2 and "missing.onnx does not exist" in err
    (tmp_path / "bad.onnx").write_bytes(b"not a graph")
    rc, _, err = inproc("lfw", "--pack", str(tmp_path / "p.bin"), "--model",
                        str(tmp_path / "bad.onnx"), capsys=capsys)
    assert rc == 2 and "onnxruntime cannot load" in err


def test_unresolvable_fpr_is_na_and_fpr_rule_is_named(tmp_path, capsys):
    """TPR at an FPR below 1/impostors prints n/a and is null in JSON (IJB-C and MegaFace);
    --fpr-rule nearest is InsightFace's rule and the JSON says which rule made the numbers."""
    from facetrain.eval.metrics import UNRESOLVED
    rng = np.random.default_rng(8)
    info = make_ijbc(tmp_path / "IJBC", rng, n_subjects=6)
    np.save(tmp_path / "f.npy", subject_features(rng, info["subjects"], noise=1.0))
    reports = {}
    for rule in ("le", "nearest"):
        args = ["--root", str(tmp_path / "IJBC"), "--features", str(tmp_path / "f.npy"),
                "--json", str(tmp_path / f"{rule}.json"), "--no-plot"]
        rc, out, err = inproc("ijbc", *args, *(["--fpr-rule", rule] if rule != "le" else []),
                              capsys=capsys)
        assert rc == 0, err
        assert UNRESOLVED in out and f"FPR rule {rule}" in out
        reports[rule] = json.loads((tmp_path / f"{rule}.json").read_text())["1:1"]
        assert reports[rule]["fpr_rule"] == rule
    rep = reports["le"]
    n_imp = rep["impostor_pairs"]
    assert n_imp == rep["pairs"] - rep["genuine_pairs"] and n_imp < 10 ** 6
    for key, val in rep["tpr_at_fpr"].items():
        assert (val is None) == (float(key) * n_imp < 1), key
        assert (reports["nearest"]["tpr_at_fpr"][key] is None) == (val is None), key
    assert rep["tpr_at_fpr"]["1e-06"] is None
    assert rep["tpr_at_fpr"]["1e-01"] <= reports["nearest"]["tpr_at_fpr"]["1e-01"] + 0.2

    info = make_megaface(tmp_path / "mf", rng, n_ids=4, per_id=3, n_distractors=30)
    feats = np.r_[subject_features(rng, info["ids"], noise=0.5),
                  rng.normal(size=(30, 16)).astype(np.float32)]
    np.save(tmp_path / "mf.npy", feats)
    rc, out, err = inproc("megaface", "--root", str(tmp_path / "mf"), "--features",
                          str(tmp_path / "mf.npy"), "--fpr-rule", "nearest", "--json",
                          str(tmp_path / "mf.json"), "--no-plot", capsys=capsys)
    assert rc == 0, err
    assert UNRESOLVED in out and "FPR rule nearest" in out
    rep = json.loads((tmp_path / "mf.json").read_text())
    assert rep["tpr_at_fpr"] == {"1e-06": None} and rep["fpr_rule"] == "nearest"
    assert rep["impostor_pairs"] == 12 * 30
    with pytest.raises(SystemExit) as exc:                 # argparse: usage line, exit 2
        inproc("megaface", "--root", str(tmp_path / "mf"), "--fpr-rule", "closest",
               capsys=capsys)
    assert exc.value.code == 2 and "invalid choice: 'closest'" in capsys.readouterr().err


def _protocols(tmp_path):
    """Each CLI's tiny protocol: name -> (its flags without --features, feature rows, dim)."""
    from facetrain.eval import reid
    rng = np.random.default_rng(9)
    make_pack(tmp_path / "p.bin", 10, rng)
    info = make_ijbc(tmp_path / "IJBC", rng, n_subjects=4, with_1n=True)
    mf = make_megaface(tmp_path / "mf", rng, n_ids=3, per_id=3, n_distractors=10)
    make_reid(tmp_path / "market", rng, n_ids=3, n_cams=2)
    n_reid = sum(len(reid.parse_folder(tmp_path / "market" / d)[0])
                 for d in (reid.QUERY_DIR, reid.GALLERY_DIR))
    return {"lfw": (["--pack", str(tmp_path / "p.bin")], 20),
            "ijbc": (["--root", str(tmp_path / "IJBC")], len(info["subjects"])),
            "megaface": (["--root", str(tmp_path / "mf")],
                         len(mf["probes"]) + len(mf["distractors"])),
            "reid": (["--root", str(tmp_path / "market")], n_reid)}


def test_bad_features_and_outputs_fail_up_front(tmp_path, capsys):
    """NaN, [N, 0], empty and unreadable .npy features and a --json that is a directory: exit
    2 with one message naming the file, no traceback, no report."""
    protocols = _protocols(tmp_path)
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "junk.npy").write_bytes(b"not an array")
    (tmp_path / "outdir").mkdir()
    for name, (flags, rows) in protocols.items():
        good = np.random.default_rng(1).normal(size=(rows, 8)).astype(np.float32)
        nan = good.copy()
        nan[rows - 1, 3] = np.nan                   # the last row: a MegaFace distractor
        np.save(tmp_path / f"{name}_nan.npy", nan)
        np.save(tmp_path / f"{name}_w0.npy", np.zeros((rows, 0), np.float32))
        np.save(tmp_path / f"{name}_good.npy", good)
        report = tmp_path / f"{name}.json"
        cases = {f"{name}_nan.npy": f"1 of {rows} feature rows hold NaN or inf (first: row "
                                    f"{rows - 1})",
                 f"{name}_w0.npy": "zero values per row",
                 "empty.npy": "empty.npy is empty (0 bytes)",
                 "junk.npy": "junk.npy is not a readable .npy array"}
        for feats, msg in cases.items():
            rc, _, err = inproc(name, *flags, "--features", str(tmp_path / feats), "--json",
                                str(report), capsys=capsys)
            assert rc == 2 and msg in err and str(tmp_path / feats) in err, (name, feats, err)
            assert "Traceback" not in err and "only 0 were kept" not in err
            if "nan" in feats:                # the library's `features`, as the flag
                assert "run the model instead of reading --features" in err, err
            assert not report.exists()
        rc, _, err = inproc(name, *flags, "--features", str(tmp_path / f"{name}_good.npy"),
                            "--json", str(tmp_path / "outdir"), capsys=capsys)
        assert rc == 2 and f"--json {tmp_path / 'outdir'} is a directory" in err, (name, err)
        rc, _, err = inproc(name, *flags, "--features", str(tmp_path / f"{name}_good.npy"),
                            "--json", str(report), "--no-plot", capsys=capsys)
        assert rc == 0 and report.is_file(), (name, err)


def test_library_parameters_read_as_the_programs_flags(tmp_path, capsys):
    """The library names its parameters (`algo`, `features`) and knows no flag; the programs
    print their own flags in its place (eval_protocols/_common.for_command_line)."""
    import _common
    import ijbc as ijbc_cli
    from facetrain.eval import ijbc, megaface
    protocols = _protocols(tmp_path)
    with pytest.raises(ValueError, match=r"^`algo` 'a/b': the algorithm name goes into file"):
        megaface.devkit_paths(tmp_path, ["x.png"], "a/b", tmp_path / "lst")
    flags, rows = protocols["megaface"]
    np.save(tmp_path / "f.npy", np.ones((rows, 8), np.float32))
    rc, _, err = inproc("megaface", *flags, "--features", str(tmp_path / "f.npy"),
                        "--devkit-out", str(tmp_path / "dk"), "--algo", "a/b", capsys=capsys)
    assert rc == 2 and "error: --algo 'a/b': the algorithm name goes into file names" in err
    meta = ijbc.read_meta(tmp_path / "IJBC", need_landmarks=False, skip_landmarks=True)
    with pytest.raises(ValueError, match=r"\(or pass precomputed `features`\)") as exc:
        ijbc.AlignedImages(meta)
    assert _common.for_command_line(str(exc.value), ijbc_cli.build_parser()).endswith(
        "is needed to align the images (or pass precomputed --features)")
    # A --model that is not there: the program says which flag names it.
    rc, _, err = inproc("lfw", *protocols["lfw"][0], "--model", str(tmp_path / "no.pt"),
                        capsys=capsys)
    assert rc == 2 and f"model file {tmp_path / 'no.pt'} does not exist: pass --model" in err


def test_ijbc_missing_1n_csv_is_an_error_not_a_silent_1to1(tmp_path, capsys):
    flags, rows = _protocols(tmp_path)["ijbc"]
    np.save(tmp_path / "f.npy", np.random.default_rng(2).normal(size=(rows, 8)).astype("f4"))
    gallery = tmp_path / "IJBC/meta/ijbc_1N_gallery_G2.csv"
    gallery.unlink()
    args = [*flags, "--features", str(tmp_path / "f.npy"), "--json", str(tmp_path / "r.json")]
    rc, _, err = inproc("ijbc", *args, capsys=capsys)
    assert rc == 2 and f"1:N file {gallery} is missing" in err and "--no-1n" in err
    assert not (tmp_path / "r.json").exists()
    rc, out, err = inproc("ijbc", *args, "--no-1n", capsys=capsys)
    assert rc == 0 and "1:N" not in out, err
    for part in ("gallery_G1", "probe_mixed"):       # no 1:N CSV at all: a 1:1-only folder
        (tmp_path / f"IJBC/meta/ijbc_1N_{part}.csv").unlink()
    rc, out, err = inproc("ijbc", *args, capsys=capsys)
    assert rc == 0 and "1:N skipped: no ijbc_1N_*.csv" in err
    assert "1:N" not in json.loads((tmp_path / "r.json").read_text())


def test_newest_export_by_mtime(tmp_path, monkeypatch):
    """The eval CLIs' default model: the newest export under runs/, at any depth."""
    import _common as eval_common
    monkeypatch.chdir(tmp_path)
    assert eval_common.exported_backbones() == []
    for i, run in enumerate(["b", "a"]):
        p = tmp_path / "runs" / run / "export" / "backbone.pt"
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (1000 + i, 1000 + i))
    assert eval_common.exported_backbones()[-1].parts[-3] == "a"
    deep = tmp_path / "runs" / "main" / "leap_full_seed2" / "export" / "backbone.pt"
    deep.parent.mkdir(parents=True)                      # the main job's layout, one level deeper
    deep.write_bytes(b"x")
    os.utime(deep, (2000, 2000))
    assert eval_common.exported_backbones()[-1] == Path("runs/main/leap_full_seed2/export/backbone.pt")
    assert len(eval_common.exported_backbones()) == 3
