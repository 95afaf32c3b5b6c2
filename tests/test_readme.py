"""The README's two set-up commands stay true: CI runs the second one verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_commands():
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text())[:2]


def test_readme_starts_with_install_and_test_commands():
    install, test = readme_commands()
    assert install.startswith("pip install torch==2.13.0 && pip install -e . && stablediff generate ")
    assert "python -m pytest" in test


def test_ci_runs_the_readme_test_command():
    _, test = readme_commands()
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert test in ci  # its other lines run what the default run leaves out
