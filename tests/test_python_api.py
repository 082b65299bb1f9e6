"""README's "Using pykvm from Python": its example runs as written, and its names are exported."""

from __future__ import annotations

import re

import pykvm
from tests.conftest import REPO, requires_kvm

pytestmark = requires_kvm


def _readme_example() -> str:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using pykvm from Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the section has one example"
    return blocks[0]


def test_readme_example_runs(guest_images):
    exec(compile(_readme_example(), "README.md (Using pykvm from Python)", "exec"), {"__name__": "readme"})


def test_every_name_the_readme_lists_is_exported():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using pykvm from Python\n", 1)[1].split("```python", 1)[0]
    names = re.findall(r"`([A-Za-z_]+)`", section.split("exports the objects the command uses:", 1)[1].split(". ", 1)[0])
    assert set(names) == set(pykvm.__all__) - {"__version__", "MachineState"}
    for name in names:
        assert getattr(pykvm, name) is not None
