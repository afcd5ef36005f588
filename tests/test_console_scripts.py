"""`pip install -e .` puts every non-training command on PATH; each one answers --help."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

SETUP = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
SCRIPTS = re.findall(r'"(ocr-vlm-[\w-]+)=([\w.]+):main"', SETUP)


def test_the_commands_are_declared():
    assert {name for name, _ in SCRIPTS} >= {"ocr-vlm-shards", "ocr-vlm-render", "ocr-vlm-generate", "ocr-vlm-report",
                                            "ocr-vlm-export", "ocr-vlm-plan"}


@pytest.mark.parametrize("name,module", SCRIPTS)
def test_each_entry_point_answers_help(name, module):
    """The entry point's target itself (the installed wrapper is `from module import main; main()`)."""
    result = subprocess.run([sys.executable, "-c", f"import sys; sys.argv = ['{name}', '--help']; "
                             f"from {module} import main; main()"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]
