"""Package metadata: what pip reads before installing (requirements, license, description, extras),
and what the source distribution carries. Runs setup.py egg_info into a temporary directory."""
import email.parser
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not (REPO / "setup.py").exists(), reason="needs the source tree")


@pytest.fixture(scope="module")
def egg_info(tmp_path_factory):
    out = tmp_path_factory.mktemp("egg")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (info,) = out.glob("*.egg-info")
    return info


def test_requirements_leave_torch_alone(egg_info):
    metadata = email.parser.Parser().parsestr((egg_info / "PKG-INFO").read_text())
    requires = metadata.get_all("Requires-Dist")
    plain = [r for r in requires if ";" not in r]
    torch_reqs = [r for r in plain if r.split(">")[0].split("=")[0].split("<")[0].strip() == "torch"]
    # a lower bound pip finds satisfied by any recent torch (CPU or CUDA build), never an upper one
    assert torch_reqs == ["torch>=2.4"], requires
    assert "tqdm" in plain and "ninja" in plain
    assert 'matplotlib; extra == "bench"' in requires
    assert metadata["Requires-Python"] == ">=3.9"


def test_build_system_does_not_pull_torch():
    try:
        import tomllib
    except ImportError:
        tomllib = pytest.importorskip("tomli")
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]
    assert not any(r.lower().startswith("torch") for r in build["requires"]), build


def test_license_and_description(egg_info):
    metadata = email.parser.Parser().parsestr((egg_info / "PKG-INFO").read_text())
    assert metadata["License"] == "MIT" and metadata["License-File"] == "LICENSE"
    assert "Copyright (c) 2026 the amdim-kernels authors" in (REPO / "LICENSE").read_text()
    assert metadata["Description-Content-Type"] == "text/markdown"
    assert metadata.get_payload().lstrip().startswith("# amdim-kernels")
    assert "Typing :: Typed" in metadata.get_all("Classifier")


def test_source_distribution_carries_sources_and_typing_marker(egg_info):
    sources = set((egg_info / "SOURCES.txt").read_text().split())
    csrc = {p.relative_to(REPO).as_posix() for p in (REPO / "csrc").rglob("*") if p.is_file()}
    assert csrc and csrc <= sources, csrc - sources
    assert {"amdim_kernels/py.typed", "LICENSE", "CHANGELOG.md", "README.md"} <= sources
