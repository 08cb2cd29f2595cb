"""Packaging.

By default nothing is compiled at install time: the C++/CUDA ops are built on first use
(amdim_kernels/_extension.py, torch.utils.cpp_extension.load) and cached, so installing needs no
torch in a build environment and never downloads or replaces the torch you have. csrc/ ships
inside the package for that first-use build.

AMDIM_KERNELS_BUILD_OPS=1 builds the ops at install time instead (for compute nodes without a
compiler, or to ship a wheel), like DeepSpeed's DS_BUILD_OPS:

    AMDIM_KERNELS_BUILD_OPS=1 pip install --no-build-isolation .

--no-build-isolation is required there: the build compiles against the torch that will run it, so
that torch must be importable by setup.py; an isolated build environment would have no torch, or
would download a different one.
"""
import importlib.util
import json
import os
import shutil
import sys

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithSources(build_py):
    """Copies csrc/ into the package: the first-use build compiles it from there."""

    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "amdim_kernels", "csrc")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "csrc"), dest)


def _load_extension_module():
    """amdim_kernels/_extension.py alone: importing the package would load the ops."""
    path = os.path.join(ROOT, "amdim_kernels", "_extension.py")
    spec = importlib.util.spec_from_file_location("_amdim_kernels_extension", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def ahead_of_time_build():
    """The extension module and the build_ext command for AMDIM_KERNELS_BUILD_OPS=1."""
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError as err:
        raise SystemExit(
            "AMDIM_KERNELS_BUILD_OPS=1 compiles the ops against the installed torch, which setup.py "
            f"could not import ({err}). Install torch first, then run\n"
            "    AMDIM_KERNELS_BUILD_OPS=1 pip install --no-build-isolation .\n"
            "(--no-build-isolation lets the build see that torch instead of an empty, isolated "
            "environment).") from err
    ext = _load_extension_module()
    options = ext.aot_build_options(os.path.join(ROOT, "csrc"))
    make = cpp_extension.CUDAExtension if options["with_cuda"] else cpp_extension.CppExtension
    module = make(
        name=f"amdim_kernels.{ext.AOT_MODULE}",
        sources=[os.path.relpath(s, ROOT) for s in options["sources"]],
        extra_compile_args={"cxx": options["cflags"], "nvcc": options["cuda_cflags"]},
        extra_link_args=options["ldflags"],
    )
    metadata = options["metadata"]
    print(f"amdim-kernels: building the ops ahead of time ({'C++/CUDA' if options['with_cuda'] else 'C++'}, "
          f"torch {metadata['torch']})")

    class BuildExtWithMetadata(cpp_extension.BuildExtension):
        """Records beside the library what it was built against: at import, a build for another
        torch is not loaded (the ops are compiled on first use instead)."""

        def run(self):
            super().run()
            target = os.path.dirname(self.get_ext_fullpath(module.name))
            with open(os.path.join(target, ext.AOT_METADATA), "w") as f:
                json.dump(metadata, f, indent=1)

    return [module], BuildExtWithMetadata


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


ext_modules, cmdclass = [], {"build_py": BuildPyWithSources}
if os.environ.get("AMDIM_KERNELS_BUILD_OPS", "0") not in ("", "0"):
    ext_modules, cmdclass["build_ext"] = ahead_of_time_build()

setup(
    name="amdim-kernels",
    version="0.2.0",
    description="Fused, memory-lean AMDIM / Deep InfoMax contrastive losses for PyTorch, and an AMDIM trainer",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    license="MIT",
    license_files=["LICENSE"],
    classifiers=[
        "Development Status :: 3 - Alpha",
        "Intended Audience :: Science/Research",
        "Operating System :: POSIX :: Linux",
        "Programming Language :: C++",
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
        "Typing :: Typed",
    ],
    keywords=["pytorch", "contrastive learning", "deep infomax", "amdim", "triton", "fused kernels"],
    packages=find_packages(include=["amdim_kernels", "amdim_kernels.*", "amdim", "amdim.*"]),
    package_data={"amdim_kernels": ["py.typed"]},
    python_requires=">=3.9",
    # torch >= 2.4: torch.library.register_fake / register_autograd / register_kernel / opcheck.
    # No upper bound, and torch is never in [build-system] requires: pip leaves a satisfying torch
    # (CPU or CUDA build) alone, and an isolated build would download one.
    # ninja: the first-use build of csrc/; scikit-learn: the built-in digits dataset of amdim.train;
    # tqdm: amdim.train's progress bar.
    install_requires=["torch>=2.4", "ninja", "numpy", "scikit-learn", "tqdm"],
    extras_require={
        # triton: the tests run the Triton kernels under its CPU interpreter and compile them for sm_90;
        # matplotlib: the benchmark plots are tested too
        "test": ["pytest", "triton", "pillow", "matplotlib"],
        "triton": ["triton"],
        "amdim": ["pillow"],        # image-folder datasets
        "bench": ["matplotlib"],    # benchmark plots
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
