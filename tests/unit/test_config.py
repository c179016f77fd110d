import pytest

from facetrain.config import ConfigError, load_config


def test_overrides_and_roundtrip(tmp_path):
    cfg = load_config(None, ["optim.lr=0.05", "leap.mode=off", "schedule.milestones=[1,2]",
                             "head.margin.kind=arcface"])
    assert cfg.optim.lr == 0.05 and cfg.leap.mode == "off"
    assert load_config(None, ["leap.control=null"]).leap.control == "null"
    assert cfg.schedule.milestones == (1.0, 2.0)
    assert cfg.head.margin.kind == "arcface"
    cfg.save(tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


def test_misspelled_key_is_an_error():
    with pytest.raises(ConfigError, match="unknown config key 'optim.lrr'.*lr"):
        load_config(None, ["optim.lrr=1"])


def test_bad_value_names_key_and_rule():
    with pytest.raises(ConfigError, match=r"head.sample_rate must be in \(0.0, 1.0\]; got 1.5"):
        load_config(None, ["head.sample_rate=1.5"])
    with pytest.raises(ConfigError, match="leap.mode must be one of off, vanilla, full"):
        load_config(None, ["leap.mode=fancy"])
    with pytest.raises(ConfigError, match="train.epochs must be an integer"):
        load_config(None, ["train.epochs=1.5"])


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN", ".nan"])
def test_non_finite_floats_are_rejected_everywhere(value, tmp_path):
    for key in ("optim.lr", "head.margin.scale", "leap.center_lr", "schedule.min_lr"):
        with pytest.raises(ConfigError, match=rf"{key} must be a finite number; got"):
            load_config(None, [f"{key}={value}"])
    # The same from a YAML file (YAML's own .nan / .inf literals).
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: .inf\n")
    with pytest.raises(ConfigError, match="optim.lr must be a finite number"):
        load_config(path)
    path.write_text("schedule:\n  milestones: [1, .nan]\n")
    with pytest.raises(ConfigError, match="schedule.milestones must be a finite number"):
        load_config(path)


def test_base_file_then_overrides(tmp_path):
    (tmp_path / "a.yaml").write_text("optim:\n  lr: 0.2\ntrain:\n  epochs: 3\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\ntrain:\n  epochs: 5\n")
    cfg = load_config(tmp_path / "b.yaml")
    assert cfg.optim.lr == 0.2 and cfg.train.epochs == 5
    cfg2 = load_config(tmp_path / "b.yaml", ["train.epochs=7"])
    assert cfg2.train.epochs == 7 and cfg2.optim.lr == 0.2 and cfg.train.epochs == 5


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("/nonexistent/x.yaml")


def test_every_main_job_method_loads_with_the_default_config():
    from experiments.jobs import METHODS, REPO
    for name, overrides in METHODS.items():
        cfg = load_config(REPO / "configs" / "default.yaml", list(overrides))
        assert cfg.leap.mode in ("off", "full", "vanilla"), name
    assert load_config(None, list(METHODS["null_control"])).leap.control == "null"
    assert load_config(None, list(METHODS["uniform_control"])).leap.control == "uniform"
    assert load_config(None, list(METHODS["shuffled_control"])).leap.control == "shuffled"
    cfg = load_config(REPO / "configs" / "default.yaml", list(METHODS["class_balanced"]))
    assert cfg.head.class_balance_beta > 0 and cfg.leap.mode == "off"
    cfg = load_config(REPO / "configs" / "default.yaml", list(METHODS["repeat_factor"]))
    assert cfg.data.repeat_factor_threshold > 0 and cfg.leap.mode == "off"
    assert cfg.train.epochs == 3 * cfg.schedule.cycle_epochs
    from facetrain.config import MARGIN_KINDS
    kinds = {load_config(REPO / "configs" / "default.yaml", list(o)).head.margin.kind
             for o in METHODS.values()}
    assert kinds == set(MARGIN_KINDS) - {"arcface", "combined"}   # every newer head is a method


def test_leap_width_scale_and_controls():
    assert load_config(None, []).leap.width_scale == 1.0
    assert load_config(None, ["leap.width_scale=3"]).leap.width_scale == 3.0
    for bad in ("0", "-1", ".inf", ".nan"):
        with pytest.raises(ConfigError, match="leap.width_scale"):
            load_config(None, [f"leap.width_scale={bad}"])
    for control in ("none", "uniform", "shuffled", "uniform_meangap"):
        assert load_config(None, [f"leap.control={control}"]).leap.control == control
    with pytest.raises(ConfigError, match="leap.control must be one of"):
        load_config(None, ["leap.control=random"])


# ---- config files a user gets wrong: one message each, naming the file or field ----------
def test_config_file_not_utf8_is_named(tmp_path):
    cfg = tmp_path / "latin1.yaml"
    cfg.write_bytes("train:\n  output_dir: runs/caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert str(info.value) == (f"config file {cfg} is not UTF-8 text (byte 29 is 0xe9); save it "
                               "as UTF-8")


@pytest.mark.parametrize("base", ["5", "[a.yaml]", "''", "{x: 1}"])
def test_base_that_is_not_a_path_is_named(tmp_path, base):
    cfg = tmp_path / "child.yaml"
    cfg.write_text(f"base: {base}\noptim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    import yaml
    assert str(info.value) == (f"config file {cfg}: 'base:' must be the path of another YAML "
                               f"file (relative to this one); got {yaml.safe_load(base)!r}")


def test_tuple_of_the_wrong_length_is_named(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optim.betas=[0.9, 0.99, 0.999]"])
    assert str(info.value) == ("optim.betas must be a list of 2 values; got 3: "
                               "[0.9, 0.99, 0.999]")
    cfg = tmp_path / "one.yaml"
    cfg.write_text("optim:\n  betas: [0.9]\n")
    with pytest.raises(ConfigError, match=r"^optim.betas must be a list of 2 values; got 1: "):
        load_config(cfg)
    assert load_config(None, ["optim.betas=[0.8, 0.9]"]).optim.betas == (0.8, 0.9)
    # variable-length tuples keep taking any length
    assert load_config(None, ["schedule.milestones=[1, 2, 3]"]).schedule.milestones == \
        (1.0, 2.0, 3.0)


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n"])
def test_empty_config_file_is_an_error_not_all_defaults(tmp_path, text):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    assert str(info.value) == (f"config file {cfg} is empty (or only comments); write its "
                               "settings, or `{}` for all defaults")
    # a base: that is empty is named too; `{}` is an explicit choice of all defaults
    child = tmp_path / "child.yaml"
    child.write_text("base: empty.yaml\n")
    with pytest.raises(ConfigError, match=f"^config file {cfg} is empty"):
        load_config(child)
    cfg.write_text("{}\n")
    assert load_config(cfg) == load_config(None)
