"""The checkout's top-level kernels/ folder is dimap_fast.kernels and never hides an installed `kernels`,
nor breaks transformers' probe for one where none is installed.

transformers imports Hugging Face's package of that name; from the repository root (on sys.path under
`python -m pytest`, `python -c`, `python -m`) the folder would be found first. These checks install
nothing: Hugging Face's `kernels` is in the dev environment (requirements-lock.txt); without it (the
GPU machine's image may lack it) the same builds must work.
"""

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ROOT / "kernels" / "__init__.py"

# Both names resolved from the root, then both Hugging Face families built.
_FROM_ROOT = """
import importlib, importlib.util, json, dimap_fast.kernels, transformers
found = importlib.util.find_spec("kernels")  # what transformers' probe does first
kernels = importlib.import_module("kernels") if found else None
small = dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
transformers.SwinForImageClassification(transformers.SwinConfig(**small))
transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**small))
print(json.dumps({"kernels": getattr(kernels, "__file__", None), "ours": dimap_fast.kernels.__file__,
                  "has_launchers": hasattr(dimap_fast.kernels, "window_attention")}))
"""

import kernels as top_level  # noqa: E402  (Hugging Face's package, or the stand-in without it)

try:  # the dev environment has it (requirements-lock.txt); the GPU machine's image may not
    importlib.metadata.distribution("kernels")
    HF_INSTALLED = True
except importlib.metadata.PackageNotFoundError:
    HF_INSTALLED = False


def _run(args, **kw):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def _assert_resolved(found: dict) -> None:
    if HF_INSTALLED:
        theirs = Path(found["kernels"]).resolve()
        assert theirs != OURS and "site-packages" in theirs.parts, theirs
    else:
        assert found["kernels"] is None  # the stand-in: transformers reads it as not installed
    assert Path(found["ours"]).resolve() == OURS and found["has_launchers"]


def test_in_this_process_kernels_is_the_installed_package():
    # `make test` runs `python -m pytest` from the root: the root is on this process's sys.path.
    import dimap_fast.kernels

    _assert_resolved({"kernels": top_level.__file__, "ours": dimap_fast.kernels.__file__,
                      "has_launchers": hasattr(dimap_fast.kernels, "window_attention")})
    assert hasattr(top_level, "CUDAProperties") == HF_INSTALLED  # what transformers imports from it


def test_python_c_from_the_root_builds_hugging_face_swins():
    out = _run([sys.executable, "-c", _FROM_ROOT])
    assert out.returncode == 0, out.stderr[-2000:]
    _assert_resolved(json.loads(out.stdout.splitlines()[-1]))


def test_pytest_from_the_root_builds_hugging_face_swins(tmp_path):
    probe = tmp_path / "test_probe.py"
    probe.write_text("import json\n\ndef test_probe():\n" + "".join(
        f"    {line}\n" for line in _FROM_ROOT.strip().splitlines()) + "")
    for runner in ([sys.executable, "-m", "pytest"], [str(Path(sys.executable).with_name("pytest"))]):
        out = _run([*runner, "-q", "-s", "-p", "no:cacheprovider", "--rootdir", str(tmp_path), str(probe)])
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        _assert_resolved(json.loads(next(line for line in out.stdout.splitlines() if line.startswith("{"))))


def test_the_console_script_from_the_root_rebuilds_a_hugging_face_swin(tmp_path):
    transformers = pytest.importorskip("transformers")
    from dimap_fast.io.models import save_shrunk

    config = transformers.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                                       window_size=4)
    path = save_shrunk(transformers.Swinv2ForImageClassification(config), tmp_path / "hf.safetensors")
    script = shutil.which("dimap-fast", path=str(Path(sys.executable).parent)) or "dimap-fast"
    out = _run([script, "report", str(path), "--json"], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout)


def test_without_an_installed_package_the_name_kernels_reads_as_absent(tmp_path):
    # An empty site: only the checkout's root, so nothing else of that name can be found. The name
    # then holds an empty stand-in, which transformers' probe (find_spec, no distribution, then an
    # import: no __file__ and no __version__) reads as "not installed" instead of failing.
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
            "import importlib.util, json, kernels\n"
            "probe = importlib.util.find_spec('kernels')\n"
            "try:\n    kernels.window_attention\nexcept AttributeError as e:\n    why = str(e)\n"
            "print(json.dumps({'file': kernels.__file__, 'version': getattr(kernels, '__version__', 'N/A'),"
            " 'found': probe is not None, 'why': why}))\n")
    out = _run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["file"] is None and seen["version"] == "N/A"  # transformers: package_exists = False
    assert "dimap_fast.kernels" in seen["why"]
