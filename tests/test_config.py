"""Config loading: presets, base chains, overrides, and one clear error per kind of bad value."""
import pytest
import yaml

from hvd_ba.config import ConfigError, check_paths, load_config


def test_default_preset_is_the_paper_recipe():
    cfg = load_config("resnet50")
    assert (cfg.data.copies, cfg.model.arch, cfg.model.ghost_size) == (4, "resnet50", 64)
    assert cfg.augment.size == 224 and cfg.augment.scale == [0.08, 1.0]
    assert cfg.augment.ratio == pytest.approx([3 / 4, 4 / 3]) and cfg.augment.hflip == 0.5
    assert (cfg.augment.eval_resize, cfg.augment.eval_crop) == (256, 224)
    o = cfg.optim
    assert (o.base_lr, o.reference_batch, o.momentum, o.weight_decay) == (0.1, 256, 0.9, 1e-4)
    assert (o.epochs, o.warmup_epochs, o.milestones, o.decay) == (90, 5.0, [30.0, 60.0, 80.0], 0.1)


def test_demo_preset_is_a_delta_on_the_recipe():
    cfg = load_config("demo")
    assert cfg.model.arch == "small_resnet" and cfg.data.copies == 4
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 1e-4  # inherited through `base:`


def test_dotted_overrides_are_typed():
    cfg = load_config("demo", ["data.copies=8", "optim.milestones=[3, 4]", "optim.weight_decay=5e-5"])
    assert cfg.data.copies == 8
    assert cfg.optim.milestones == [3.0, 4.0]
    assert cfg.optim.weight_decay == 5e-5  # YAML 1.1 reads 5e-5 as a string; accepted as a float


def test_user_yaml_with_base_chain(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump({"base": "demo", "data": {"copies": 2}}))
    cfg = load_config(str(path))
    assert cfg.data.copies == 2 and cfg.model.arch == "small_resnet"


@pytest.mark.parametrize("overrides, message", [
    (["data.copiez=2"], "unknown config key 'data.copiez'"),
    (["dta.copies=2"], "unknown config section 'dta'"),
    (["data.copies=two"], "config key 'data.copies': expected an integer, got 'two'"),
    (["data.copies=2.5"], "config key 'data.copies': expected an integer"),
    (["data.copies=-1"], "config key 'data.copies': must be >= 1, got -1"),
    (["model.ghost_size=48"], "config key 'model.ghost_size': 48 does not divide the samples per rank per step"),
    (["optim.base_lr=fast"], "config key 'optim.base_lr': expected a number, got 'fast'"),
    (["optim.nesterov=1"], "config key 'optim.nesterov': expected true/false"),
    (["optim.milestones=[60, 30]"], "config key 'optim.milestones': must be increasing"),
    (["augment.scale=[0.5, 0.1]"], "config key 'augment.scale'"),
    (["data.layout=diagonal"], "config key 'data.layout'"),
    (["copies=3"], "override 'copies=3': expected section.key=value"),
    (["run.checkpoint_timeout=0"], "config key 'run.checkpoint_timeout': must be > 0 and at most 7 days"),
    (["run.stall_timeout=.inf"], "config key 'run.stall_timeout': must be > 0 and at most 7 days (604800 s), got inf"),
    (["model.arch=resnet5"], "config key 'model.arch': must be one of ('resnet50', 'mobilenet', 'alexnet', "
                             "'small_resnet'), got 'resnet5'"),
    (["model.width=0.3", "model.arch=resnet50"], "config key 'model.width': resnet50 has no width multiplier here "
                                                 "(use 1.0), got 0.3"),
    (["model.arch=mobilenet", "model.width=0.03"], "config key 'model.width': 0.03 leaves mobilenet's narrowest "
                                                   "layer no channel"),
    (["data.workers=-1"], "config key 'data.workers': must be >= 0 or null, got -1"),
    (["augment.hflip=1.5"], "config key 'augment.hflip': must be in [0, 1], got 1.5"),
    (["optim.momentum=.nan"], "config key 'optim.momentum': must be in [0, 1), got nan"),
])
def test_bad_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("demo", overrides)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_every_architecture_the_config_allows_is_built_and_fits_its_width():
    """model.arch's choices are the networks models/nets.py builds; a width the config lets through
    builds (mobilenet at its narrowest 1/32, small_resnet far below)."""
    from hvd_ba.config import ARCHS
    from hvd_ba.models.nets import BUILDERS, build_model

    assert tuple(BUILDERS) == ARCHS
    for arch, width in (("mobilenet", 1 / 32), ("small_resnet", 0.01)):
        cfg = load_config("demo", [f"model.arch={arch}", f"model.width={width}"])
        build_model(cfg.model.arch, 10, None, width=cfg.model.width)


def test_unknown_preset_lists_the_shipped_ones():
    with pytest.raises(ConfigError, match=r"config file 'resnet05' not found \(shipped presets: alexnet, demo, mobilenet, resnet50\)"):
        load_config("resnet05")


def test_missing_data_path_and_unwritable_out_dir(tmp_path, small_data):
    with pytest.raises(ConfigError, match="config key 'data.path': not set"):
        check_paths(load_config("demo"))
    with pytest.raises(ConfigError, match=f"data directory '{tmp_path}/train' does not exist"):
        check_paths(load_config("demo", [f"data.path={tmp_path}"]))
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where a folder should be: unwritable even for root
    with pytest.raises(ConfigError, match=f"config key 'run.out_dir': cannot write to '{blocker}/run'"):
        check_paths(load_config("demo", [f"data.path={small_data}", f"run.out_dir={blocker}/run"]))
    check_paths(load_config("demo", [f"data.path={small_data}", f"run.out_dir={tmp_path}/ok"]))
    assert list((tmp_path / "ok").iterdir()) == []  # the write probe is cleaned up


def test_the_yaml_fallback_reads_every_preset_as_pyyaml_does():
    """hvd_ba/yaml_lite.py stands in for PyYAML where only torch is installed (the GPU check)."""
    import yaml

    from hvd_ba import yaml_lite
    from hvd_ba.config import CONFIG_DIR

    presets = sorted(CONFIG_DIR.glob("*.yaml"))
    assert len(presets) >= 4
    for path in presets:
        text = path.read_text()
        assert yaml_lite._lite_load(text) == (yaml.safe_load(text) or {}), path.name
    for value in ("0.1", "[0.25, 1.0]", "1e-4", "1.5e-3", "null", "true", "False", "8", "-3", "runs/x", "[]", "'a b'"):
        assert yaml_lite.scalar(value) == yaml.safe_load(value), value
    with pytest.raises(ValueError, match="line 2"):
        yaml_lite._lite_load("data:\n  - a list item\n")


def test_the_backends_own_shutdown_outlasts_every_wait_the_watchdogs_allow():
    """Horovod's stall shutdown and the torch process-group timeout are the backstops: at least
    1 h, 4 x run.stall_timeout, and 1.5 x run.checkpoint_timeout (a slow checkpoint write must be
    ended by the watchdog that names it, or not at all, never by the backend first)."""
    from hvd_ba.dist import process_group_timeout

    assert process_group_timeout(None) == 3600 and process_group_timeout(300, 1800) == 3600
    assert process_group_timeout(1200, 1800) == 4800
    assert process_group_timeout(300, 4000) == 6000 > 1.25 * 4000
