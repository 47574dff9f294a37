"""The wheel: an installed fusejax finds its shipped configs (the demo's, the study's, the mesh presets)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_a_wheel_ships_every_config_and_the_installed_package_reads_them(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("fusejax", "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist")], cwd=src, check=True, capture_output=True)
    wheel, = (tmp_path / "dist").glob("fusejax-*.whl")
    shipped = {n.removeprefix("fusejax/configs/") for n in zipfile.ZipFile(wheel).namelist()
               if n.startswith("fusejax/configs/")}
    assert shipped == {str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml")}

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    probe = ("import fusejax, fusejax.config as c, fusejax.embedded as e, fusejax.chat_toy as t, fusejax.study as s\n"
             "print(fusejax.__file__); print(c.CONFIGS)\n"
             "for path in (e.DEFAULT_CONFIG, t.DEFAULT_CONFIG, s.SAME_ARCH_CONFIG): c.load_config(path)\n"
             "print(len(list(s.STUDY_CONFIGS.glob('*.yaml'))))\n")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(site),
                         "JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin"}, check=True, capture_output=True,
                         text=True).stdout.split("\n")
    assert Path(out[0]).is_relative_to(site)  # the unpacked wheel, not this checkout
    assert Path(out[1]) == site / "fusejax" / "configs"
    assert int(out[2]) == len(list((ROOT / "configs" / "study").glob("*.yaml")))
