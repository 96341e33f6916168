"""The distribution installs one namespace, ``attnzoo``, and no top-level ``kernels``/``layers`` packages."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_maps_folders_onto_the_attnzoo_namespace(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("attnzoo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {n.split("/")[0] for n in names}
    assert top_level == {"attnzoo", next(t for t in top_level if t.endswith(".dist-info"))}
    for module in (
        "__init__.py",
        "layers/__init__.py",
        "kernels/dispatch.py",
        "recipes/__init__.py",
        "weights/io.py",
        "gated_vit.py",
        "cli.py",
    ):
        assert f"attnzoo/{module}" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "attnzoo = attnzoo.cli:main" in entry_points


def test_installed_subpackages_form_one_namespace():
    """An editable install of this checkout maps the repo folders; any other install has ``attnzoo/<sub>/``."""
    import attnzoo
    import attnzoo.kernels
    import attnzoo.layers
    import attnzoo.recipes
    import attnzoo.weights

    base = Path(attnzoo.__file__).resolve().parent
    editable = base == ROOT / "zoo"
    for module, folder in [
        (attnzoo.layers, "layers"),
        (attnzoo.kernels, "kernels"),
        (attnzoo.recipes, "recipes"),
        (attnzoo.weights, "weights"),
    ]:
        expected = ROOT / folder if editable else base / folder
        assert Path(module.__file__).resolve().parent == expected
