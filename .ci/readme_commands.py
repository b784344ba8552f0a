"""CI helper: print the README's quick-start commands, or a project's requirements.

``readme_commands.py README.md`` prints each line of the first ``bash`` block under the
``## Quick start`` heading (one command a line), so CI runs exactly what the README says.
``readme_commands.py --requirements pyproject.toml EXTRA...`` prints the core dependencies and
those extras' requirements, one a line (to build an environment without installing llmc itself).
"""

from __future__ import annotations

import re
import sys
import tomllib


def quick_start(readme: str) -> list[str]:
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    if block is None:
        raise SystemExit("README: no ```bash block under '## Quick start'")
    return [line.strip() for line in block.group(1).splitlines() if line.strip()]


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    project = tomllib.loads(pyproject)["project"]
    reqs = list(project["dependencies"])
    for extra in extras:
        reqs += project["optional-dependencies"][extra]
    return reqs


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[0] == "--requirements":
        lines = requirements(open(args[1], encoding="utf-8").read(), args[2:])
    else:
        lines = quick_start(open(args[0], encoding="utf-8").read())
    print("\n".join(lines))
