"""Packaging. The C++/CUDA ops are compiled on first use (torch.utils.cpp_extension.load) and
cached, so installing never needs torch in a build environment and never downloads or replaces
the torch you have. csrc/ ships inside the package for that first-use build."""
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = os.path.dirname(os.path.abspath(__file__))


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        dest = os.path.join(self.build_lib, "amdim_kernels", "csrc")
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, "csrc"), dest)


setup(
    name="amdim-kernels",
    version="0.1.0",
    description="Fused, memory-lean AMDIM / Deep InfoMax contrastive losses for PyTorch, and an AMDIM trainer",
    packages=find_packages(include=["amdim_kernels", "amdim_kernels.*", "amdim", "amdim.*"]),
    python_requires=">=3.9",
    # torch is deliberately not listed: pip must never swap the user's torch build.
    # ninja: the first-use build of csrc/; scikit-learn: the built-in digits dataset of amdim.train
    install_requires=["ninja", "numpy", "scikit-learn"],
    extras_require={
        # triton: the tests run the Triton kernels under its CPU interpreter and compile them for sm_90
        "test": ["pytest", "triton", "pillow"],
        "triton": ["triton"],
        "amdim": ["pillow", "tqdm"],   # image-folder datasets; a progress bar
    },
    cmdclass={"build_py": BuildPyWithSources},
)
