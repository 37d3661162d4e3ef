"""scripts/setup.sh prints nothing alarming: setuptools' BuildBackendWarning for editable installs is
filtered by its message for the install step, and only that warning."""

from __future__ import annotations

import os
import re
import subprocess
import sys

SETUP = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "setup.sh")

EMIT = """
import warnings
class BuildBackendWarning(UserWarning):
    pass
warnings.warn("Editable installation.\\n!!\\n\\n  Please be careful with folders ...", BuildBackendWarning)
warnings.warn("something else", UserWarning)
"""


def test_setup_filters_only_the_editable_install_warning():
    text = open(SETUP).read().replace("\\\n", " ")
    install = next(line for line in text.splitlines() if 'pip install -q -e ".[test]"' in line)
    match = re.search(r'PYTHONWARNINGS="([^"]+)"', install)
    assert match, "the editable install does not filter setuptools' warning"
    env = {**os.environ, "PYTHONWARNINGS": match.group(1)}
    err = subprocess.run([sys.executable, "-c", EMIT], env=env, capture_output=True, text=True, check=True).stderr
    assert "Editable installation" not in err and "something else" in err
