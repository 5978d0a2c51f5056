"""Builds the transfer_engine extension with CMake (the project's own build).

pip runs this through pyproject.toml. The module is built for the
interpreter running pip. Build directory: $TE_CMAKE_BUILD_DIR if set (an
existing configured build is reused as it is: only the module target is
built), else build/pip.
"""

import os
import subprocess
import sys
import sysconfig

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        build_dir = os.environ.get("TE_CMAKE_BUILD_DIR") or os.path.join(ROOT, "build", "pip")
        build_dir = os.path.abspath(build_dir)
        if not os.path.exists(os.path.join(build_dir, "CMakeCache.txt")):
            subprocess.check_call([
                "cmake", "-S", ROOT, "-B", build_dir, "-G", "Ninja", "-DCMAKE_BUILD_TYPE=Release",
                "-DTE_PYTHON=ON", f"-DTE_PYTHON_EXECUTABLE={sys.executable}",
            ])
        subprocess.check_call(["cmake", "--build", build_dir, "--target", "_transfer_engine"])
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        built = os.path.join(build_dir, "python", "transfer_engine", "_transfer_engine" + suffix)
        if not os.path.exists(built):
            raise RuntimeError(f"{built} was not built: the build in {build_dir} targets another interpreter "
                               f"than {sys.executable}; unset TE_CMAKE_BUILD_DIR or point it elsewhere")
        target = self.get_ext_fullpath(ext.name)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        self.copy_file(built, target)


setup(
    ext_modules=[Extension("transfer_engine._transfer_engine", sources=[])],
    cmdclass={"build_ext": CMakeBuild},
)
