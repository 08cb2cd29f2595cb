"""How the C++ extension is built and found: content-hashed first-use builds shared by every copy of
the sources, toolchain errors, the build lock (stale and live holders) and the ahead-of-time build.

A tiny C source (no torch headers: it compiles in a fraction of a second) stands in for csrc/
where a test needs a build of its own; only the ahead-of-time test compiles csrc/ again."""
import ctypes
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import zipfile

import pytest
import torch

from amdim_kernels import _extension as ext

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = pathlib.Path(ext.package_dir())


def run_python(code, cwd, env=None, timeout=600):
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


# ---- the build name: a hash of content and flags -------------------------------------------------
def copy_sources(dest):
    shutil.copytree(ext.source_dir(), dest, ignore=shutil.ignore_patterns("__pycache__"))
    return str(dest)


def test_copies_with_the_same_sources_share_one_build_name(tmp_path):
    a, b = copy_sources(tmp_path / "a"), copy_sources(tmp_path / "b")
    os.utime(os.path.join(b, "nce.cpp"), (1, 1))  # mtimes and locations do not matter
    spec_a, spec_b = ext.jit_spec(a, with_cuda=False), ext.jit_spec(b, with_cuda=False)
    assert spec_a.name == spec_b.name
    assert spec_a.name.startswith(ext.BASE_NAME + "_") and len(spec_a.name) == len(ext.BASE_NAME) + 13
    assert spec_a.sources != spec_b.sources  # each copy compiles its own files


@pytest.mark.parametrize("changed", ["nce.cpp", "cuda/nce_bwd.cuh"])
def test_a_changed_source_or_header_gives_a_new_build_name(tmp_path, changed):
    a, b = copy_sources(tmp_path / "a"), copy_sources(tmp_path / "b")
    with open(os.path.join(b, changed), "a") as f:
        f.write("\n// edited\n")
    assert ext.jit_spec(a, with_cuda=False).name != ext.jit_spec(b, with_cuda=False).name


def test_flags_and_cuda_are_part_of_the_build_name(tmp_path, monkeypatch):
    root = copy_sources(tmp_path / "a")
    digest, sources = ext.sources_digest(root), ext.source_files(root, False)
    base = dict(cflags=["-O3"], ldflags=[], cuda_cflags=[], with_cuda=False)
    name = ext.make_spec("x", sources, digest, **base).name
    assert ext.make_spec("x", sources, digest, **base).name == name
    assert ext.make_spec("x", sources, digest, **{**base, "cflags": ["-O2"]}).name != name
    assert ext.make_spec("x", sources, digest, **{**base, "with_cuda": True}).name != name
    monkeypatch.setenv("CXX", "clang++")
    assert ext.make_spec("x", sources, digest, **base).name != name


def test_needs_compile_until_a_build_has_finished(tmp_path):
    spec = ext.jit_spec(with_cuda=False)
    build_dir = tmp_path / spec.name
    build_dir.mkdir()
    assert not ext.is_built(str(build_dir), spec)
    (build_dir / f"{spec.name}.so").write_bytes(b"")  # a half-linked library of a killed build
    assert not ext.is_built(str(build_dir), spec)
    (build_dir / "build-ok.json").write_text("{}")
    assert ext.is_built(str(build_dir), spec)


def test_another_copy_of_the_package_reuses_the_build_without_compiling(tmp_path):
    # this copy's first-use build (compiled here if this is the first test to need it)
    loaded = ext.build_and_load(ext.jit_spec())
    copy = tmp_path / "copy"
    shutil.copytree(PACKAGE, copy / "amdim_kernels",
                    ignore=shutil.ignore_patterns("__pycache__", "*.so", ext.AOT_METADATA))
    if not (copy / "amdim_kernels" / "csrc").exists():
        copy_sources(copy / "csrc")
    proc = run_python("""
        import torch, amdim_kernels, amdim_kernels.ops
        from amdim_kernels import _extension
        print(amdim_kernels.__file__)
        print(_extension.load())
        src, trg = torch.randn(3, 5), torch.randn(3, 2, 5)
        print(float(amdim_kernels.fused_nce_loss(src, trg)[0] - amdim_kernels.nce_loss_reference(src, trg)[0]))
        """, cwd=copy)
    assert proc.returncode == 0, proc.stderr
    package_file, library, difference = proc.stdout.split()
    assert package_file.startswith(str(copy))
    assert library == loaded
    assert "compiling" not in proc.stderr, proc.stderr
    assert abs(float(difference)) < 1e-5


# ---- toolchain errors ----------------------------------------------------------------------------
def test_missing_compiler_is_named_with_the_fix_and_the_reference_backend(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    with pytest.raises(ext.BuildError) as err:
        ext.check_compiler()
    message = str(err.value)
    assert "/nonexistent/g++" in message and "CXX" in message
    assert "apt-get install g++" in message and 'backend="reference"' in message

    monkeypatch.delenv("CXX")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ext.BuildError, match=r"no C\+\+ compiler \(c\+\+\) is on PATH.*backend=\"reference\""):
        ext.check_compiler()


def test_missing_ninja_is_named_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(ext, "_ninja_dirs", lambda: [str(tmp_path)])
    with pytest.raises(ext.BuildError) as err:
        ext.find_ninja()
    message = str(err.value)
    assert "needs ninja" in message and "pip install ninja" in message and "activate" in message
    assert 'backend="reference"' in message


def test_ninja_of_an_environment_that_is_not_activated_is_used(monkeypatch, tmp_path):
    pytest.importorskip("ninja")  # an install requirement: present wherever the package was installed
    monkeypatch.setenv("PATH", str(tmp_path))  # PATH of a shell whose virtual environment is not active
    ninja, directory = ext.find_ninja()
    assert directory in ext._ninja_dirs() and os.path.dirname(ninja) == directory
    assert subprocess.run([ninja, "--version"], capture_output=True).returncode == 0
    with ext._path_with(directory):
        assert shutil.which("ninja") == ninja  # what torch's "ninja" resolves to during the build
    assert os.environ["PATH"] == str(tmp_path)


def test_without_a_compiler_the_fused_loss_says_what_is_missing_and_reference_works(tmp_path):
    proc = run_python("""
        import torch, amdim_kernels as ak
        from amdim_kernels._extension import BuildError
        src, trg = torch.randn(4, 8), torch.randn(4, 3, 8)
        try:
            ak.fused_nce_loss(src, trg)
        except BuildError as err:
            print("ERROR:", err)
        print("REFERENCE:", float(ak.fused_nce_loss(src, trg, backend="reference")[0]))
        """, cwd=REPO, env={"CXX": "/nonexistent/c++", "TORCH_EXTENSIONS_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    assert "ERROR:" in proc.stdout and "/nonexistent/c++" in proc.stdout
    assert 'backend="reference"' in proc.stdout and "REFERENCE:" in proc.stdout


# ---- the build lock ------------------------------------------------------------------------------
TINY = 'extern "C" int amdim_tiny_answer() { return 42; }\n'


def tiny_spec(tmp_path, text=TINY):
    source = tmp_path / "tiny.cpp"
    source.write_text(text)
    return ext.make_spec("amdim_tiny", [str(source)], ext.sources_digest(str(tmp_path)),
                         cflags=[], ldflags=[], cuda_cflags=[], with_cuda=False)


def hold_lock(build_dir, seconds, torch_lock=False):
    """A process that holds the build lock (and, like a build in progress, torch's lock file)."""
    code = f"""
        import os, sys, time
        sys.path.insert(0, {str(REPO)!r})
        from amdim_kernels._extension import build_lock
        with build_lock({str(build_dir)!r}):
            if {torch_lock}:
                os.close(os.open(os.path.join({str(build_dir)!r}, "lock"), os.O_CREAT | os.O_EXCL))
            print("held", flush=True)
            time.sleep({seconds})
        """
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held", holder.stderr.read()
    return holder


def call_tiny(library):
    return ctypes.CDLL(library).amdim_tiny_answer()


def test_a_build_killed_midway_leaves_no_lock_that_blocks_the_next_one(tmp_path, capfd, monkeypatch):
    monkeypatch.setenv(ext.TIMEOUT_ENV, "120")
    spec = tiny_spec(tmp_path)
    build_dir = tmp_path / "ext" / spec.name
    holder = hold_lock(build_dir, 600, torch_lock=True)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (build_dir / "lock").exists()  # torch's FileBaton would wait for this file forever
    library = ext.build_and_load(spec, root=str(tmp_path / "ext"))
    assert call_tiny(library) == 42
    err = capfd.readouterr().err
    assert "removing" in err and "interrupted" in err and "waiting" not in err
    assert not (build_dir / "lock").exists()


def test_a_waiter_names_the_live_builder_and_proceeds_when_it_is_done(tmp_path, capfd):
    spec = tiny_spec(tmp_path, TINY + "// waiter\n")
    build_dir = tmp_path / "ext" / spec.name
    holder = hold_lock(build_dir, 3)
    try:
        library = ext.build_and_load(spec, root=str(tmp_path / "ext"))
    finally:
        holder.kill()
        holder.wait()
    assert call_tiny(library) == 42
    err = capfd.readouterr().err
    assert f"waiting for process {holder.pid} on " in err and str(build_dir) in err


def test_a_waiter_gives_up_after_the_timeout_naming_the_holder(tmp_path):
    build_dir = tmp_path / "ext" / "amdim_tiny_x"
    holder = hold_lock(build_dir, 600)
    try:
        with pytest.raises(ext.BuildError) as err:
            with ext.build_lock(str(build_dir), timeout_s=1.0, poll_s=0.05):
                pass
    finally:
        holder.kill()
        holder.wait()
    message = str(err.value)
    assert f"process {holder.pid}" in message and "amdim-build.lock" in message
    assert ext.TIMEOUT_ENV in message
    with ext.build_lock(str(build_dir), timeout_s=5.0):  # the holder is gone: the lock is free
        pass


def test_a_build_error_carries_the_compiler_message(tmp_path):
    spec = tiny_spec(tmp_path, "this is not C++\n")
    with pytest.raises(ext.BuildError, match="failed") as err:
        ext.build_and_load(spec, root=str(tmp_path / "ext"))
    assert "tiny.cpp" in str(err.value) and 'backend="reference"' in str(err.value)
    assert not ext.is_built(str(tmp_path / "ext" / spec.name), spec)


# ---- the ahead-of-time build ---------------------------------------------------------------------
def test_shipped_build_is_used_only_when_it_matches_the_running_torch():
    good = {**ext.torch_abi(), "with_cuda": ext._cuda_toolkit_usable(),
            "sources": ext.sources_digest(ext.source_dir())}
    assert ext._shipped_mismatch(good) is None
    for key, value, words in (("torch", "2.4.0", "torch 2.4.0"), ("cuda", "12.1", "CUDA 12.1"),
                              ("cxx11_abi", not good["cxx11_abi"], "C++ ABI"),
                              ("python", "cpython-39", "Python cpython-39"),
                              ("sources", "0" * 64, "other sources")):
        why = ext._shipped_mismatch({**good, key: value})
        assert why is not None and words in why, (key, why)


AOT_FILES = ["setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "CHANGELOG.md",
             "amdim_kernels", "amdim", "csrc"]


@pytest.mark.slow  # compiles csrc/ once more (about 40 s of CPU; minutes on a busy 2-core machine)
def test_ahead_of_time_wheel_ships_the_ops_and_falls_back_when_torch_differs(tmp_path):
    if not (REPO / "setup.py").exists():
        pytest.skip("needs the source tree (setup.py)")
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    src.mkdir()
    for name in AOT_FILES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy(REPO / name, src / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps",
                            "--no-index", ".", "-w", str(tmp_path / "wheel")], cwd=src,
                           env={**os.environ, ext.BUILD_ENV: "1"}, capture_output=True, text=True,
                           timeout=1200)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        zf.extractall(site)
    assert any(n.startswith("amdim_kernels/_ops.") and n.endswith(".so") for n in names), names
    assert {"amdim_kernels/py.typed", "amdim_kernels/csrc/nce.cpp", "amdim_kernels/_ops_build.json"} <= set(names)
    meta_path = site / "amdim_kernels" / ext.AOT_METADATA
    meta = json.loads(meta_path.read_text())
    assert meta["torch"] == torch.__version__ and meta["sources"] == ext.sources_digest(ext.source_dir())
    build_ninja = next((src / "build").rglob("build.ninja")).read_text()
    assert "-march=native" not in build_ninja  # portable: the wheel runs on other machines

    check = """
        import torch, amdim_kernels as ak
        from amdim_kernels import _extension
        src = torch.randn(6, 9, requires_grad=True); trg = torch.randn(6, 4, 9)
        fused, reference = ak.fused_nce_loss(src, trg)[0], ak.nce_loss_reference(src, trg)[0]
        print(ak.__file__); print(_extension.load()); print(float(fused - reference))
        # portable flags, yet the CPU epilogue of this CPU's instruction set (#pragma GCC target)
        isa, cap = torch.ops.amdim_kernels.cpu_epilogue_isa(), torch.backends.cpu.get_cpu_capability()
        assert isa == cap or cap not in ("AVX2", "AVX512"), (isa, cap)
        """
    empty_cache = tmp_path / "empty_cache"
    proc = run_python(check, cwd=site, env={"TORCH_EXTENSIONS_DIR": str(empty_cache)})
    assert proc.returncode == 0, proc.stderr
    package_file, library, difference = proc.stdout.split()
    assert package_file.startswith(str(site)) and library.startswith(str(site / "amdim_kernels" / "_ops."))
    assert abs(float(difference)) < 1e-5
    assert "compiling" not in proc.stderr and not any(empty_cache.glob("*/*.so"))

    # built for another torch: not loaded; the first-use build (this checkout's, same sources) is used
    meta_path.write_text(json.dumps({**meta, "torch": "0.0.0"}))
    proc = run_python(check, cwd=site)
    assert proc.returncode == 0, proc.stderr
    assert "not using the prebuilt extension" in proc.stderr and "built for torch 0.0.0" in proc.stderr
    assert proc.stdout.split()[1] == ext.build_and_load(ext.jit_spec())
    assert abs(float(proc.stdout.split()[2])) < 1e-5


def test_a_bad_timeout_setting_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(ext.TIMEOUT_ENV, "ten minutes")
    with pytest.raises(ext.BuildError, match="AMDIM_KERNELS_BUILD_TIMEOUT='ten minutes': expected a number"):
        with ext.build_lock(str(tmp_path)):
            pass
