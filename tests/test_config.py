"""Config loading: presets, base chains, overrides, and one clear error per kind of bad value."""
import math

import pytest
import yaml

from hvd_ba.config import ConfigError, check_paths, load_config

pytestmark = pytest.mark.unit


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


def test_set_values_are_read_as_pyyaml_reads_them():
    from hvd_ba.config import parse_override

    for text, value in (("yes", True), ("off", False), (".inf", math.inf), ("0x10", 16), ("1e-4", "1e-4"),
                        ("[[1, 2], [3]]", [[1, 2], [3]]), ("{a: [1, b]}", {"a": [1, "b"]})):
        assert parse_override(f"run.x={text}") == ("run.x", value), text
    with pytest.raises(ConfigError, match=r"^override 'data.path=\[a': not valid YAML \(.*\)$"):
        parse_override("data.path=[a")
    with pytest.raises(ConfigError, match=r"not valid YAML .*python/object"):  # a tag that would build objects
        parse_override("data.path=!!python/object:os.system x")


def test_a_runs_config_yaml_is_block_style_and_loads_back(tmp_path):
    from hvd_ba.config import save_config

    cfg = load_config("demo", ["augment.scale=[0.25, 1.0]"])
    save_config(cfg, tmp_path / "config.yaml", "run-1")
    text = (tmp_path / "config.yaml").read_text()
    assert text.startswith("run_id: run-1\ndata:\n") and "  scale:\n  - 0.25\n  - 1.0\n" in text
    assert yaml.safe_load(text) == {"run_id": "run-1", **cfg.to_dict()}
    assert load_config(str(tmp_path / "config.yaml")) == cfg


def test_the_backends_own_shutdown_outlasts_every_wait_the_watchdogs_allow():
    """Horovod's stall shutdown and the torch process-group timeout are the backstops: at least
    1 h, 4 x run.stall_timeout, and 1.5 x run.checkpoint_timeout (a slow checkpoint write must be
    ended by the watchdog that names it, or not at all, never by the backend first)."""
    from hvd_ba.dist import process_group_timeout

    assert process_group_timeout(None) == 3600 and process_group_timeout(300, 1800) == 3600
    assert process_group_timeout(1200, 1800) == 4800
    assert process_group_timeout(300, 4000) == 6000 > 1.25 * 4000
