"""Reading the Prometheus text exposition in tests (prometheus_client's own parser)."""

from __future__ import annotations

import urllib.request
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


@dataclass(frozen=True)
class Scrape:
    text: str
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float]
    families: dict[str, str]  # family name -> type

    def value(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels besides model_name (and le, quantile)."""
        matches = [
            v for (n, ls), v in self.samples.items()
            if n == name and {k: x for k, x in ls if k != "model_name"} == labels
        ]  # fmt: skip
        assert len(matches) == 1, (name, labels, matches)
        return matches[0]

    def sample_names(self) -> set[str]:
        return {name for name, _ in self.samples}


def scrape(url: str) -> Scrape:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    samples = {}
    families = {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return Scrape(text, samples, families)
