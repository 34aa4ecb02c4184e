"""Prints dinoforge's requirements, one per line: the dependencies in pyproject.toml plus those of
the extras named in the second argument (comma-separated), with extras that name dinoforge's own
extras (``image = ["dinoforge[cloud,operator]"]``) expanded. scripts/build_image.sh downloads them
into the image's wheelhouse."""

import re
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as handle:
        project = tomllib.load(handle)["project"]
    optional = project.get("optional-dependencies", {})
    own = re.compile(rf"^{re.escape(project['name'])}\[([^\]]*)\]$")
    found: list[str] = list(project["dependencies"])

    def add(extra: str) -> None:
        if extra not in optional:
            raise SystemExit(f"requirements.py: no extra {extra!r} in {pyproject} (it has {sorted(optional)})")
        for requirement in optional[extra]:
            if match := own.match(requirement.replace(" ", "")):
                for inner in match.group(1).split(","):
                    add(inner)
            elif requirement not in found:
                found.append(requirement)

    for extra in extras:
        add(extra)
    return found


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], [e for e in (sys.argv[2:3] or [""])[0].split(",") if e])))
