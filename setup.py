"""Copies the shipped weights (models/) and export profiles (export/) into the wheel at build time, so
that `pip install mixformer-deploy` works outside a clone; models/ and export/ stay the human-facing home."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
SHIPPED = {"models": ("*.safetensors", "*.md", "examples/*.png"), "export": ("*.toml",)}


class BuildWithShippedFiles(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "mixformer_deploy" / "_shipped"
        for folder, patterns in SHIPPED.items():
            for pattern in patterns:
                found = sorted((ROOT / folder).glob(pattern))
                if not found:  # a wheel without them installs fine and then fails at the user's first command
                    raise SystemExit(f"setup.py: nothing matches {folder}/{pattern}; the wheel would ship "
                                     "without the shipped weights or profiles (is MANIFEST.in complete?)")
                for f in found:
                    dest = target / folder / f.relative_to(ROOT / folder)
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(f, dest)


setup(cmdclass={"build_py": BuildWithShippedFiles})
