"""Build hook (everything else is in pyproject.toml): ship ``configs/*.yaml`` inside the package.

The experiment configs live in ``configs/`` at the top of the repository, where users look for
them. A built wheel (``pip install .``, ``python -m build``) must carry them too, so that an
installed ``fuseseg run`` works from any folder: ``build_py`` copies them into the built package
as ``pipelines/configs/``. They are copied at build time only, so there is one copy in the
repository and nothing that can drift. ``pipelines.experiment.shipped_configs_dir`` finds them
in either place.
"""
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    def run(self):
        super().run()
        dest = Path(self.build_lib) / "pipelines" / "configs"
        self.mkpath(str(dest))
        for src in sorted((Path(__file__).resolve().parent / "configs").glob("*.yaml")):
            self.copy_file(str(src), str(dest / src.name))


setup(cmdclass={"build_py": BuildPyWithConfigs})
