"""Render ``helm/mistral-serve`` with the Helm v4 SDK (helm-python-sdk, no helm binary)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import helm_python as helm
import yaml

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "helm" / "mistral-serve"
SCENARIOS = sorted((CHART / "ci").glob("*-values.yaml"))
RELEASE = "demo"
NAMESPACE = "llm"

Manifest = dict[str, Any]


def scenario_values(path: Path) -> dict[str, Any]:
    values = yaml.safe_load(path.read_text())
    assert isinstance(values, dict), f"{path} must hold a mapping"
    return values


@functools.cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def render(values: dict[str, Any] | None = None, release: str = RELEASE) -> list[Manifest]:
    """Every object the chart renders for ``values``, in template order (NOTES.txt left out)."""
    rendered = chart().render(values or {}, name=release, namespace=NAMESPACE, is_install=True)
    objects: list[Manifest] = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def scenario(name: str) -> dict[str, Any]:
    """The values of ``ci/<name>-values.yaml``."""
    return scenario_values(CHART / "ci" / f"{name}-values.yaml")


def render_scenario(name: str) -> list[Manifest]:
    return render(scenario(name))


def render_notes(values: dict[str, Any] | None = None) -> str:
    rendered = chart().render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return next(text for template, text in rendered.items() if template.endswith("NOTES.txt"))


def only(objects: list[Manifest], kind: str) -> Manifest:
    found = [obj for obj in objects if obj["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def kinds(objects: list[Manifest]) -> list[str]:
    return sorted(obj["kind"] for obj in objects)
