"""benchmarks/train_throughput.py keeps working on CPU (tiny sizes): its GPU rows are the anchor
table's, and the step it times is the trainer's own engine step."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load():
    if str(REPO / "benchmarks") not in sys.path:     # as `python benchmarks/x.py` runs it: its
        sys.path.insert(0, str(REPO / "benchmarks"))  # folder first, for classifier_bench
    spec = importlib.util.spec_from_file_location("train_throughput",
                                                  REPO / "benchmarks" / "train_throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_cpu_rows_run_and_report(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    bench = _load()
    out = tmp_path / "r.json"
    rows = ["tiny-b64-c20k-sr0.1-leap", "tiny-b64-c20k-sr0.1-rows-leap"]
    results = bench.main(["--rows", ",".join(rows), "--warmup", "1", "--steps", "1",
                          "--json", str(out)])
    assert [r.row for r in results] == rows
    for r in results:
        assert r.error is None and r.samples_per_s > 0 and r.ms_per_step > 0
        assert r.sample_rate == 0.1 and r.leap == "full" and r.classes == 20_000
    assert [r.update_rows for r in results] == ["all", "sampled"]
    assert out.read_text().count('"row"') == 2


def test_heads_are_timed_against_cosface(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    results = _load().main(["--rows", "tiny-b64-c2k", "--heads", "curricularface", "--rounds", "1",
                            "--warmup", "1", "--steps", "1"])
    assert [(r.head, r.vs_cosface_pct is None) for r in results] == [
        ("cosface", True), ("curricularface", False)]
    curricular = results[1]
    assert (curricular.vs_cosface_min_pct <= curricular.vs_cosface_pct
            <= curricular.vs_cosface_max_pct)
    assert all(r.cpu_ms_per_step > 0 and r.ms_per_step > 0 for r in results)


def test_any_config_is_timed_leap_off_against_on(monkeypatch):
    """--config: the main job's config (its backbone, embedding size, margin and LEAP mode),
    LEAP off and on in alternating rounds; the warm-up leaves tail classes perturbed."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    out = _load().main(["--config", str(REPO / "configs" / "default.yaml"), "--set",
                        "data.batch_size=16", "--classes", "200", "--warmup", "12",
                        "--steps", "1", "--rounds", "2"])
    assert out["classes"] == 200 and out["batch"] == 16 and out["perturbed_classes"] > 0
    assert out["off_best_ms"] > 0 and out["leap_best_ms"] > 0 and out["ratio_best"] > 0


def test_gpu_rows_are_the_anchor_rows():
    rows = _load().GPU_ROWS
    assert rows["r50-b256-c93k"][:4] == ("iresnet50", 256, 93_431, 1.0)
    assert rows["r50-b256-c2m-sr0.1"][:4] == ("iresnet50", 256, 2_000_000, 0.1)
    assert rows["r50-b128-c93k"][:4] == ("iresnet50", 128, 93_431, 1.0)


def test_unknown_row_is_an_error():
    with pytest.raises(SystemExit, match="unknown row"):
        _load().main(["--rows", "nope"])


def test_gpu_session_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "gpu_session.sh")]).returncode == 0


def test_plain_loop_is_the_configs_cosface_and_is_timed(monkeypatch):
    """--plain: the plain loop's loss is CosFace of the config (float64 reference written from
    the formula), and its timing is reported against facetrain with LEAP off."""
    import copy

    import torch
    from facetrain.config import load_config
    from facetrain.dist import init_distributed
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    bench = _load()
    cfg = load_config(str(REPO / "configs" / "default.yaml"), ["data.batch_size=8"])
    plain = bench._PlainLoop(cfg, init_distributed("cpu"), 50)
    x = torch.randn(8, 3, cfg.data.image_size, cfg.data.image_size)
    y = torch.randint(0, 50, (8,))
    ref_net = copy.deepcopy(plain.backbone).double().eval()
    plain.backbone.eval()
    loss = plain.micro_step(x, y)
    emb = ref_net(x.double())
    emb = emb / emb.norm(dim=1, keepdim=True)
    w = plain.weight.detach().double()
    cos = emb @ (w / w.norm(dim=1, keepdim=True)).T
    m = cfg.head.margin
    logits = m.scale * (cos - m.m_cos * torch.nn.functional.one_hot(y, 50))
    ref = (torch.logsumexp(logits, 1) - logits[torch.arange(8), y]).mean()
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    out = bench.main(["--config", str(REPO / "configs" / "default.yaml"), "--set",
                      "data.batch_size=16", "--classes", "200", "--warmup", "2", "--steps", "1",
                      "--rounds", "3", "--plain"])
    assert out["plain_best_ms"] > 0 and out["off_vs_plain_best"] > 0
