"""The Dockerfile, checked without a Docker engine: what it copies, runs and exposes exists
and agrees with the Makefile, the server's flags and the Helm chart."""

from __future__ import annotations

import re
import shlex
import tomllib
from pathlib import Path

import yaml

from server.options import env_names

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
VALUES = yaml.safe_load((ROOT / "helm" / "mistral-serve" / "values.yaml").read_text())


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with line continuations joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    result = []
    for line in joined.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def arguments(keyword: str) -> list[str]:
    return [rest for key, rest in instructions() if key == keyword]


def env_settings() -> dict[str, str]:
    settings: dict[str, str] = {}
    for rest in arguments("ENV"):
        for item in shlex.split(rest):
            name, _, value = item.partition("=")
            settings[name] = value
    return settings


def test_every_copied_path_exists_in_the_repository() -> None:
    copies = arguments("COPY")
    assert copies
    for rest in copies:
        *sources, _destination = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"


def test_the_copied_tree_holds_every_package_the_project_installs() -> None:
    copied = {source for rest in arguments("COPY") for source in rest.split()[:-1]}
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [pattern.rstrip("*") for pattern in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]]
    for package in packages:
        assert f"{package}/" in copied, package
    assert "clients/" in copied  # the generated stubs the server imports
    for needed in ("pyproject.toml", "Makefile", "README.md"):  # pyproject's readme, the install recipe
        assert needed in copied


def test_it_installs_with_the_readmes_make_target_and_existing_variables() -> None:
    runs = " ".join(arguments("RUN"))
    assert "make install" in runs
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^install:", makefile, re.MULTILINE)
    passed = set(re.findall(r"\b([A-Z_]+)=", runs.split("make install", 1)[1]))
    assert passed == {"VENV", "EXTRAS", "TORCH_SPEC", "TORCH_PIP_ARGS", "XFORMERS_SPEC"}
    for variable in passed:
        assert re.search(rf"^{variable} \?=", makefile, re.MULTILINE), f"the Makefile has no {variable} ?= default"
    assert "docker build" in (ROOT / "README.md").read_text()  # the README documents the image


def test_it_runs_the_console_script_as_a_non_root_user() -> None:
    (entrypoint,) = arguments("ENTRYPOINT")
    (cmd,) = arguments("CMD")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert entrypoint == '["mistral-serve"]' and "mistral-serve" in pyproject["project"]["scripts"]
    assert cmd == '["serve"]'
    (user,) = arguments("USER")
    uid, gid = (int(part) for part in user.split(":"))
    assert uid != 0 and gid != 0
    assert VALUES["podSecurityContext"]["runAsUser"] == uid  # the chart runs the image's user
    assert VALUES["podSecurityContext"]["runAsGroup"] == gid
    assert f"--uid {uid}" in " ".join(arguments("RUN"))


def test_the_model_cache_is_the_volume_the_chart_mounts() -> None:
    env = env_settings()
    assert env["MISTRALSERVE_CACHE_DIR"] == VALUES["model"]["mountPath"]
    assert arguments("VOLUME") == [f'["{VALUES["model"]["mountPath"]}"]']
    assert env["TORCH_EXTENSIONS_DIR"].startswith("/tmp/")  # the chart's writable emptyDir
    assert env["XDG_CACHE_HOME"].startswith("/tmp/")
    server_variables = {name for name in env if name.startswith("MISTRALSERVE_")}
    assert server_variables <= env_names()


def test_exposed_ports_are_the_charts_server_ports() -> None:
    (exposed,) = arguments("EXPOSE")
    server = VALUES["server"]
    assert sorted(int(port) for port in exposed.split()) == sorted(
        [server["port"], server["httpPort"], server["healthPort"], server["metricsPort"]]
    )


def test_the_variant_argument_selects_cpu_or_cuda_torch() -> None:
    text = DOCKERFILE.read_text()
    assert "ARG VARIANT=cpu" in text
    assert "https://download.pytorch.org/whl/cpu" in text
    assert re.search(r"cuda\) torch_args=\"\"", text)
    assert re.search(r"^TORCH_SPEC \?= torch==", (ROOT / "Makefile").read_text(), re.MULTILINE)
