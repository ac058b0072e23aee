"""The checkout's top-level kernels/ folder is dimap_fast.kernels and never hides an installed `kernels`.

transformers imports Hugging Face's package of that name; from the repository root (on sys.path under
`python -m pytest`, `python -c`, `python -m`) the folder would be found first. These checks install
nothing: Hugging Face's `kernels` is in the dev environment (requirements-lock.txt).
"""

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
import json, kernels, dimap_fast.kernels, transformers
small = dict(image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4)
transformers.SwinForImageClassification(transformers.SwinConfig(**small))
transformers.Swinv2ForImageClassification(transformers.Swinv2Config(**small))
print(json.dumps({"kernels": kernels.__file__, "ours": dimap_fast.kernels.__file__,
                  "has_launchers": hasattr(dimap_fast.kernels, "window_attention")}))
"""

hf_kernels = pytest.importorskip("kernels", reason="Hugging Face's kernels package is in the dev environment")


def _run(args, **kw):
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def _assert_resolved(found: dict) -> None:
    theirs = Path(found["kernels"]).resolve()
    assert theirs != OURS and "site-packages" in theirs.parts, theirs
    assert Path(found["ours"]).resolve() == OURS and found["has_launchers"]


def test_in_this_process_kernels_is_the_installed_package():
    # `make test` runs `python -m pytest` from the root: the root is on this process's sys.path.
    import dimap_fast.kernels

    _assert_resolved({"kernels": hf_kernels.__file__, "ours": dimap_fast.kernels.__file__,
                      "has_launchers": hasattr(dimap_fast.kernels, "window_attention")})
    assert hasattr(hf_kernels, "CUDAProperties")  # what transformers imports from it


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


def test_without_an_installed_package_the_name_kernels_is_missing(tmp_path):
    # An empty site: only the checkout's root, so nothing else of that name can be found.
    code = ("import sys; sys.path[:] = [p for p in sys.path if 'site-packages' not in p]\n"
            "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print(e.name, '|', e)\n")
    out = _run([sys.executable, "-c", code])
    assert out.returncode == 0, out.stderr[-2000:]
    name, message = out.stdout.strip().split(" | ")
    assert name == "kernels" and "dimap_fast.kernels" in message
