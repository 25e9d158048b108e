"""The dependency pins must not drift apart.

Five places name dependencies: pyproject.toml, requirements.txt (webserver/daemon
image), requirements-user-code.txt (user-code/Ray image), requirements-dev.txt
(local, includes the user-code file with -r) and requirements-bench.txt (benchmark-only
extras: the SedonaDB peer, the chart, the RSS sampler). These tests fail, naming the file, the
package and the versions, when:

- a requirement is not pinned with a single exact ``==`` version;
- one package has different versions in different places;
- pyproject's ``dependencies`` differ from requirements-user-code.txt (extras included),
  or its ``webserver``/``dev``/``bench`` extras from the requirement files they mirror;
- the Dagster family is inconsistent: dagster and dagster-webserver on one version,
  and every integration (dagster-postgres, dagster-aws, ...) on the matching
  integration release 0.(X+16).Y for core 1.X.Y.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = REPO / "pyproject.toml"
REQUIREMENT_FILES = ("requirements.txt", "requirements-user-code.txt", "requirements-dev.txt",
                     "requirements-bench.txt")

# Released in lockstep with `dagster` itself (same version number). Every other
# dagster-* package is an integration library on the 0.(X+16).Y line.
DAGSTER_CORE_VERSIONED = {
    "dagster",
    "dagster-webserver",
    "dagster-graphql",
    "dagster-pipes",
    "dagster-shared",
    "dagit",
}
# Third-party packages whose names start with dagster- but are not released by
# Dagster: pinned exactly like anything else, but not on Dagster's version lines.
DAGSTER_THIRD_PARTY = {"dagster-ray"}
INTEGRATION_MINOR_OFFSET = 16  # dagster 1.13.27 <-> dagster-postgres 0.29.27


@dataclass(frozen=True)
class Pin:
    source: str  # "requirements.txt:3" or "pyproject.toml [project.dependencies]"
    name: str  # canonical name
    extras: frozenset[str]
    version: str  # the text after ==
    text: str  # the requirement as written

    def key(self) -> tuple[str, frozenset[str], str]:
        return (self.name, self.extras, self.version)


def parse_requirement(text: str, source: str) -> Pin:
    try:
        requirement = Requirement(text)
    except InvalidRequirement as error:
        pytest.fail(f"{source}: cannot parse requirement {text!r}: {error}")
    specifiers = list(requirement.specifier)
    assert len(specifiers) == 1 and specifiers[0].operator == "==" and "*" not in specifiers[0].version, (
        f"{source}: {requirement.name} must be pinned to one exact version with '==' "
        f"(found {str(requirement.specifier) or 'no version at all'!r} in {text!r})"
    )
    assert requirement.url is None, f"{source}: {text!r}: direct URLs are not allowed"
    assert requirement.marker is None, f"{source}: {text!r}: environment markers are not allowed"
    return Pin(
        source=source,
        name=canonicalize_name(requirement.name),
        extras=frozenset(canonicalize_name(extra) for extra in requirement.extras),
        version=specifiers[0].version,
        text=text,
    )


def read_requirements(filename: str, _seen: tuple[str, ...] = ()) -> tuple[list[Pin], list[Pin]]:
    """(own pins, pins included with -r) of a requirements file, following -r recursively."""
    path = REPO / filename
    assert path.is_file(), f"{filename} does not exist"
    assert filename not in _seen, f"-r cycle: {' -> '.join((*_seen, filename))}"
    own: list[Pin] = []
    included: list[Pin] = []
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = re.split(r"(?:^|\s)#", raw, maxsplit=1)[0].strip()
        if not line:
            continue
        source = f"{filename}:{number}"
        option = re.match(r"(-r|--requirement)(?:\s+|=)(\S+)$", line)
        if option:
            target = (path.parent / option.group(2)).resolve().relative_to(REPO).as_posix()
            sub_own, sub_included = read_requirements(target, (*_seen, filename))
            included += sub_own + sub_included
            continue
        assert not line.startswith("-"), (
            f"{source}: option {line!r} is not supported here (only -r): pins must be plain "
            "'name==version' lines"
        )
        own.append(parse_requirement(line, source))
    return own, included


def all_pins(filename: str) -> list[Pin]:
    own, included = read_requirements(filename)
    return own + included


def pyproject() -> dict:
    return tomllib.loads(PYPROJECT.read_text())


def pyproject_dependencies() -> list[Pin]:
    return [
        parse_requirement(text, f"pyproject.toml [project] dependencies[{index}]")
        for index, text in enumerate(pyproject()["project"]["dependencies"])
    ]


def pyproject_extra(extra: str) -> list[Pin]:
    optional = pyproject()["project"].get("optional-dependencies", {})
    return [
        parse_requirement(text, f"pyproject.toml [project.optional-dependencies] {extra}[{index}]")
        for index, text in enumerate(optional.get(extra, []))
    ]


def every_pin() -> list[Pin]:
    pins = pyproject_dependencies()
    for extra in pyproject()["project"].get("optional-dependencies", {}):
        pins += pyproject_extra(extra)
    for filename in REQUIREMENT_FILES:
        pins += read_requirements(filename)[0]  # own lines only: includes are read once
    return pins


def versions_by_package(pins: list[Pin]) -> dict[str, dict[str, list[str]]]:
    """package -> version -> sources."""
    table: dict[str, dict[str, list[str]]] = {}
    for pin in pins:
        table.setdefault(pin.name, {}).setdefault(pin.version, []).append(pin.source)
    return table


def describe(pins: set[tuple[str, frozenset[str], str]]) -> list[str]:
    return sorted(
        f"{name}{'[' + ','.join(sorted(extras)) + ']' if extras else ''}=={version}"
        for name, extras, version in pins
    )


def integration_version_for(core: str) -> str:
    """dagster 1.X.Y -> integration 0.(X+16).Y (1.13.27 -> 0.29.27)."""
    version = Version(core)
    assert version.major == 1 and len(version.release) == 3, f"unexpected dagster version {core}"
    suffix = core[len(version.base_version) :]  # keep pre/post/dev markers as written
    return f"0.{version.minor + INTEGRATION_MINOR_OFFSET}.{version.micro}{suffix}"


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("filename", REQUIREMENT_FILES)
def test_every_requirement_is_pinned_exactly(filename: str) -> None:
    pins = all_pins(filename)  # parse_requirement asserts the '==' pin
    assert pins, f"{filename} pins nothing"


@pytest.mark.parametrize("filename", REQUIREMENT_FILES)
def test_no_package_twice_with_different_versions_in_one_file(filename: str) -> None:
    for name, versions in versions_by_package(all_pins(filename)).items():
        assert len(versions) == 1, (
            f"{filename} (with its -r includes) pins {name} at several versions: {versions}"
        )


def test_pyproject_pins_are_exact() -> None:
    pins = pyproject_dependencies()
    assert pins, "pyproject.toml [project] dependencies is empty"
    for extra in pyproject()["project"].get("optional-dependencies", {}):
        pyproject_extra(extra)  # parse_requirement asserts the '==' pin


def test_same_package_same_version_everywhere() -> None:
    drifted = {
        name: versions for name, versions in versions_by_package(every_pin()).items() if len(versions) > 1
    }
    assert not drifted, "packages pinned at different versions in different files:\n" + "\n".join(
        f"  {name}: " + "; ".join(f"{v} in {', '.join(src)}" for v, src in versions.items())
        for name, versions in sorted(drifted.items())
    )


def test_pyproject_dependencies_equal_requirements_user_code() -> None:
    project = {pin.key() for pin in pyproject_dependencies()}
    user_code = {pin.key() for pin in all_pins("requirements-user-code.txt")}
    only_project = describe(project - user_code)
    only_file = describe(user_code - project)
    assert not only_project and not only_file, (
        "pyproject.toml [project] dependencies must equal requirements-user-code.txt "
        f"exactly (extras included).\n  only in pyproject.toml: {only_project}\n"
        f"  only in requirements-user-code.txt: {only_file}"
    )


def test_pyproject_dev_extra_equals_requirements_dev_own_lines() -> None:
    extra = {pin.key() for pin in pyproject_extra("dev")}
    own = {pin.key() for pin in read_requirements("requirements-dev.txt")[0]}
    assert extra == own, (
        "pyproject.toml optional-dependencies 'dev' must equal the pins written in "
        "requirements-dev.txt (besides its -r include).\n"
        f"  only in pyproject.toml: {describe(extra - own)}\n"
        f"  only in requirements-dev.txt: {describe(own - extra)}"
    )


def test_pyproject_bench_extra_equals_requirements_bench() -> None:
    extra = {pin.key() for pin in pyproject_extra("bench")}
    assert extra, "pyproject.toml has no 'bench' extra"
    own, included = read_requirements("requirements-bench.txt")
    assert not included, "requirements-bench.txt holds its own pins only (setup.sh installs dev first)"
    pinned = {pin.key() for pin in own}
    assert extra == pinned, (
        "pyproject.toml optional-dependencies 'bench' must equal requirements-bench.txt.\n"
        f"  only in pyproject.toml: {describe(extra - pinned)}\n"
        f"  only in requirements-bench.txt: {describe(pinned - extra)}"
    )


def test_bench_pins_stay_out_of_the_images() -> None:
    """The benchmark extras are never installed into an image: not in the image requirements."""
    bench = {pin.name for pin in read_requirements("requirements-bench.txt")[0]}
    for filename in ("requirements.txt", "requirements-user-code.txt"):
        leaked = bench & {pin.name for pin in all_pins(filename)}
        assert not leaked, f"{filename} pins benchmark-only packages {sorted(leaked)}"


def test_requirements_dev_includes_the_user_code_requirements() -> None:
    _, included = read_requirements("requirements-dev.txt")
    expected = {pin.key() for pin in all_pins("requirements-user-code.txt")}
    missing = expected - {pin.key() for pin in included}
    assert not missing, (
        f"requirements-dev.txt must include requirements-user-code.txt (-r); missing {describe(missing)}"
    )


def test_pyproject_webserver_extra_matches_requirements_txt() -> None:
    requirements = {pin.name: pin.version for pin in all_pins("requirements.txt")}
    for pin in pyproject_extra("webserver"):
        assert requirements.get(pin.name) == pin.version, (
            f"{pin.source}: {pin.text} but requirements.txt pins {pin.name}=={requirements.get(pin.name)}"
        )


def _dagster_core_version(pins: list[Pin]) -> str:
    cores = {pin.version for pin in pins if pin.name == "dagster"}
    assert len(cores) == 1, f"dagster must be pinned at exactly one version, found {sorted(cores)}"
    return cores.pop()


def test_dagster_core_family_on_one_version() -> None:
    pins = every_pin()
    core = _dagster_core_version(pins)
    assert any(pin.name == "dagster-webserver" for pin in pins), "dagster-webserver is not pinned"
    for pin in pins:
        if pin.name in DAGSTER_CORE_VERSIONED:
            assert pin.version == core, (
                f"{pin.source}: {pin.name}=={pin.version}, expected {core} (same version as dagster=={core})"
            )


def test_dagster_integrations_on_the_matching_release() -> None:
    pins = every_pin()
    core = _dagster_core_version(pins)
    expected = integration_version_for(core)
    integrations = [
        pin
        for pin in pins
        if pin.name.startswith("dagster-") and pin.name not in DAGSTER_CORE_VERSIONED | DAGSTER_THIRD_PARTY
    ]
    names = {pin.name for pin in integrations}
    assert {"dagster-postgres", "dagster-aws"} <= names, f"integrations pinned: {sorted(names)}"
    for pin in integrations:
        assert pin.version == expected, (
            f"{pin.source}: {pin.name}=={pin.version}, expected {expected}: the integration "
            f"release matching dagster=={core} (1.X.Y -> 0.(X+{INTEGRATION_MINOR_OFFSET}).Y)"
        )
    postgres = {pin.version for pin in integrations if pin.name == "dagster-postgres"}
    aws = {pin.version for pin in integrations if pin.name == "dagster-aws"}
    assert postgres == aws, f"dagster-postgres {postgres} and dagster-aws {aws} must match"


def test_dagster_ray_if_present_is_pinned() -> None:
    # every_pin() already refuses an unpinned requirement anywhere; this names the
    # package explicitly because it is the one most likely to be added loosely.
    for pin in every_pin():
        if pin.name == "dagster-ray":
            assert re.fullmatch(r"[0-9][0-9A-Za-z.+-]*", pin.version), pin


def test_integration_version_rule() -> None:
    assert integration_version_for("1.13.27") == "0.29.27"
    assert integration_version_for("1.9.0") == "0.25.0"
    assert integration_version_for("1.13.27rc1") == "0.29.27rc1"


@pytest.mark.parametrize("integration", ["dagster-postgres", "dagster-aws"])
def test_integration_version_rule_matches_installed_metadata(integration: str) -> None:
    """The installed integration itself requires dagster==<core>: check the mapping rule."""
    try:
        installed = importlib.metadata.version(integration)
        requires = importlib.metadata.requires(integration) or []
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"{integration} is not installed")
    cores = [
        spec.version
        for req in map(Requirement, requires)
        if canonicalize_name(req.name) == "dagster" and req.marker is None
        for spec in req.specifier
        if spec.operator == "=="
    ]
    if not cores:
        pytest.skip(f"{integration} {installed} does not pin dagster exactly")
    assert integration_version_for(cores[0]) == installed, (
        f"installed {integration}=={installed} requires dagster=={cores[0]}, "
        f"but the rule maps that core to {integration_version_for(cores[0])}"
    )


# --------------------------------------------------------------- the parser itself


@pytest.mark.parametrize(
    "text",
    ["geopandas", "geopandas>=1.0", "geopandas~=1.2", "geopandas==1.*", "dagster-ray>=0.1"],
)
def test_loose_requirements_are_rejected(text: str) -> None:
    with pytest.raises(AssertionError, match="exact version"):
        parse_requirement(text, "example.txt:1")


def test_extras_are_part_of_the_pin() -> None:
    plain = parse_requirement("ray==2.60.0", "a")
    with_extra = parse_requirement("ray[default]==2.60.0", "b")
    assert plain.key() != with_extra.key()
    assert with_extra.extras == frozenset({"default"})
