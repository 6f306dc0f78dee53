"""Ships the spp-kernels start-up hook (see _spp_kernels_hook.py) into site-packages, for
wheels and for PEP 660 editable installs (`pip install -e .`, what the Makefile runs).
All metadata stays in pyproject.toml."""

import os

from setuptools import setup
from setuptools.command.build_py import build_py

# Named to sort after "__editable__.*.pth": under -e, that file's finder serves the hook
# module. The .start file is PEP 829's form (Python >= 3.15 runs it and then skips the
# matching .pth's import line); older Pythons ignore it.
STARTUP_FILES = {
    "spp_kernels_hook.pth": "import _spp_kernels_hook; _spp_kernels_hook.install()\n",
    "spp_kernels_hook.start": "_spp_kernels_hook:install\n",
}


class BuildPyWithStartupFiles(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            # editable_wheel points `install`'s install_lib at the unpacked editable wheel:
            # what is written there lands in site-packages (setuptools >= 64).
            target_dir = self.get_finalized_command("install").install_lib
        else:
            target_dir = self.build_lib  # bdist_wheel packs all of build_lib
        self.mkpath(target_dir)
        self._startup_files = []
        for name, text in STARTUP_FILES.items():
            path = os.path.join(target_dir, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            self._startup_files.append(path)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), *getattr(self, "_startup_files", [])]


setup(cmdclass={"build_py": BuildPyWithStartupFiles})
