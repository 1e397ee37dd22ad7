"""environment.yml parses and pins what requirements.txt pins; packaging declares the entry points."""
import re
import tomllib

import pytest

import yaml

from helpers import ROOT

pytestmark = pytest.mark.unit

PIN = re.compile(r"^\s*(?:#\s*)?-\s*([A-Za-z0-9_.-]+)==(\S+)\s*$")


def requirement_pins() -> dict:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.lower()] = version
    return pins


def test_environment_yml_parses_and_agrees_with_requirements():
    text = (ROOT / "environment.yml").read_text()
    env = yaml.safe_load(text)
    assert env["name"] == "hvd_ba"
    deps = env["dependencies"]
    assert any(isinstance(d, str) and d.startswith("python=3.11") for d in deps)
    assert "openmpi" in deps
    pip_section = next(d["pip"] for d in deps if isinstance(d, dict) and "pip" in d)
    pip_pins = dict(p.lower().split("==") for p in pip_section)
    # Packages that cluster/setup.sh builds are listed as comments under pip: (a plain pip install
    # of them fails or undoes pillow-simd); they must carry the same pins.
    pip_block = text[text.index("- pip:"):]
    built = {m.group(1).lower(): m.group(2) for m in map(PIN.match, pip_block.splitlines())
             if m and m.group(0).lstrip().startswith("#")}
    assert set(built) == {"horovod", "pillow-simd"}
    assert {**pip_pins, **built} == requirement_pins()


def test_setup_script_reads_the_same_pins():
    setup = (ROOT / "cluster" / "setup.sh").read_text()
    for name in ("torch", "torchvision", "horovod", "mpi4py", "pillow-simd"):
        assert f"pin {name})" in setup, name
    assert "requirements.txt" in setup


def test_pyproject_entry_points_and_package_data():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert meta["project"]["scripts"]["hvd-ba"] == "hvd_ba.__main__:main"
    assert "configs/*.yaml" in meta["tool"]["setuptools"]["package-data"]["hvd_ba"]
    for name in ("resnet50", "demo"):
        assert (ROOT / "hvd_ba" / "configs" / f"{name}.yaml").is_file()
    # run.backend=torch needs no Horovod: a plain install must not try to build it
    required = " ".join(meta["project"]["dependencies"])
    assert "horovod" not in required and "mpi4py" not in required
    assert {d.split(">")[0] for d in meta["project"]["optional-dependencies"]["horovod"]} == {"horovod", "mpi4py"}


def test_installed_stack_is_the_pinned_one():
    import importlib.metadata as md

    import PIL

    pins = requirement_pins()
    for name in ("torch", "torchvision", "horovod", "mpi4py"):
        assert md.version(name) == pins[name], name
    assert PIL.__version__ == pins["pillow-simd"], "pillow-simd must be the active PIL"
    import horovod.torch as hvd

    assert hvd.gloo_built() and hvd.mpi_built()
