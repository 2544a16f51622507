"""Print pip constraints that pin every dependency of pyproject.toml to its lower bound (`>=X` -> `==X`).

Used by .ci/test-lowest: the tests run against the oldest releases the declared ranges allow.
A dependency without a lower bound is an error: a range must have two tested ends.
"""

import re
import sys
import tomllib
from pathlib import Path

project = tomllib.loads(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml").read_text())["project"]
requirements = project["dependencies"] + [r for extra in project.get("optional-dependencies", {}).values() for r in extra]
for req in requirements:
    name = re.match(r"[A-Za-z0-9_.\-]+", req).group(0)
    low = re.search(r">=\s*([^,;\s]+)", req)
    if low is None:
        sys.exit(f"{req!r} in pyproject.toml has no lower bound (>=); give it one")
    print(f"{name}=={low.group(1)}")
