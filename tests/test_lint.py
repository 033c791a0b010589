"""Static checks as tests (the ros2 packages' linter-test convention), with ruff."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.linter
def test_ruff():
    ruff = shutil.which('ruff') or str(Path(sys.executable).with_name('ruff'))
    result = subprocess.run([ruff, 'check', '--no-cache', str(ROOT)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
