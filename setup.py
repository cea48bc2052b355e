"""Builds the C++ extension engine._C (pybind11, no CMake) and installs engine and kernels."""
import glob

from pybind11.setup_helpers import Pybind11Extension, build_ext
from setuptools import find_packages, setup

ext = Pybind11Extension(
    "engine._C",
    sorted(glob.glob("csrc/*.cpp")),
    cxx_std=17,
    extra_compile_args=["-O3", "-Wall", "-Wextra"],
)

setup(
    name="ltu-engine",
    version="0.1.0",
    description="Megatron-style training engine for decision-making language models",
    packages=find_packages(include=["engine", "engine.*", "kernels", "kernels.*"]),
    ext_modules=[ext],
    cmdclass={"build_ext": build_ext},
    python_requires=">=3.10",
    # torch is deliberately absent: scripts/setup.sh pins it so no CUDA build is pulled by accident.
    install_requires=["numpy", "sentencepiece", "safetensors", "pyyaml", "tqdm", "tyro", "scikit-learn", "scipy"],
)
