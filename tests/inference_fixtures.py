"""A small trained checkpoint for the tests of evaluate.py, export.py, predict.py and app.py.

One short train.py run on the bundled digits per test session, whichever of those test files run: the
fixture keeps its result in this module, which Python imports once however many test files import it.
"""

import sys
from pathlib import Path

import pytest
from conftest import run_job

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DIGITS = ROOT / "data" / "digits"
_built: dict[str, Path] = {}


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory) -> Path:
    """runs/.../checkpoint.pth of a 2-epoch resnet14_tiny on the digits (32 px); data/digits is created by
    train.py --demo if it is not there yet."""
    if "checkpoint" not in _built:
        out = tmp_path_factory.mktemp("demo_run")
        done = run_job([sys.executable, str(ROOT / "train.py"), "--demo", "--arch", "resnet14_tiny", "--epochs", "2",
                        "--output-dir", str(out)], 300, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        _built["checkpoint"] = out / "checkpoint.pth"
    return _built["checkpoint"]


def a_val_image(label: int = 3) -> Path:
    from data import make_demo_dataset  # a no-op once the digits exist; tests may run in any order

    make_demo_dataset(DIGITS)
    return sorted((DIGITS / "val" / f"digit_{label}").glob("*.jpg"))[0]
