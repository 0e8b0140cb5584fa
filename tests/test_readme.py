"""The README's configuration reference is the one generated from conf/ and the schemas."""
from pathlib import Path

from runner.config_docs import readme_section, reference


def test_readme_config_reference_is_current():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert readme_section(readme) == reference().strip("\n"), (
        "README.md is out of date: run `python -m runner.config_docs --write`")
