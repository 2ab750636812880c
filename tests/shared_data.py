"""Where the shared real data is: $CHIP_EXT_DATA or ../shared/data from the project root. Under CI
(CI=true) a missing folder is an error, not a skip."""
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def under_ci() -> bool:
    """CI=true: what would be a skip elsewhere (a missing tool or data) is a failure."""
    return os.environ.get("CI", "").lower() == "true"


def data_dir() -> Path:
    path = Path(os.environ.get("CHIP_EXT_DATA", ROOT.parent / "shared" / "data"))
    if not (path / "imagenette").is_dir():
        if under_ci():
            raise FileNotFoundError(f"the shared data folder is missing under CI: {path}")
        pytest.skip(f"shared data not found at {path} (set CHIP_EXT_DATA)")
    return path
