"""deploy/grafana and deploy/prometheus: every notifications_* metric the dashboard queries is
one that worker/metrics.py registers, and the monitoring profile of compose.yaml provisions
the dashboard, its data source and a Prometheus that scrapes the workers' metrics port."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import worker.metrics  # noqa: F401 (registers the worker's metrics)

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "notification-worker.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
METRIC = re.compile(r"\b(notifications_[a-z0-9_]+)\b")
# the sample names each kind of family exposes, in the text formats
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}


def exported() -> set[str]:
    """Every sample name the worker's registry can expose, labelled families with no child yet
    included (their family is collected, with no samples)."""
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("notifications_"):
            names |= {family.name + suffix for suffix in SUFFIXES[family.type]}
    return names


def dashboard() -> dict[str, Any]:
    document = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def panels(document: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in document["panels"]:
        yield panel
        yield from panels(panel) if "panels" in panel else ()


def queries() -> list[str]:
    return [target["expr"] for panel in panels(dashboard()) for target in panel["targets"]]


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    queried = {name for expr in queries() for name in METRIC.findall(expr)}
    assert queried, "the dashboard queries no worker metric"
    assert queried - exported() == set()


def test_the_check_catches_an_old_or_misspelt_name() -> None:
    assert "notifications_provider_request_seconds_count" not in exported()
    assert "notifications_messages_total" in exported()
    assert "notifications_messages" not in exported()
    assert "notifications_delivery_latency_seconds_bucket" in exported()


def test_the_dashboard_answers_the_runbook_s_questions() -> None:
    text = " ".join(queries())
    for needed in (
        "sum by (outcome) (rate(notifications_messages_total",
        "sum by (attempt) (rate(notifications_retries_total",
        "notifications_delivery_latency_seconds_bucket",
        "sum by (status_class) (rate(notifications_provider_request_duration_seconds_count",
        "notifications_in_flight",
        "sum by (reason) (rate(notifications_dead_letters_total",
    ):
        assert needed in text, needed


def test_panels_are_unique_placed_and_use_the_datasource_variable() -> None:
    document = dashboard()
    assert document["uid"] == "notification-worker"
    (variable,) = document["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == (
        "datasource",
        "datasource",
        "prometheus",
    )
    ids = [panel["id"] for panel in panels(document)]
    assert len(ids) == len(set(ids))
    for panel in panels(document):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def _compose() -> dict[str, Any]:
    document = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """``{container path: host path}`` of a service's bind mounts."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            found[target] = ROOT / source
    return found


def test_grafana_is_provisioned_with_the_dashboard_and_the_data_source() -> None:
    services = _compose()["services"]
    grafana = services["grafana"]
    assert grafana["profiles"] == ["monitoring"]
    mounts = _mounts(grafana)
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == GRAFANA / "provisioning"
    (datasource,) = yaml.safe_load(
        (provisioning / "datasources" / "prometheus.yaml").read_text(encoding="utf-8")
    )["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load(
        (provisioning / "dashboards" / "notification-worker.yaml").read_text(encoding="utf-8")
    )["providers"]
    folder = provider["options"]["path"]
    assert (mounts[folder] / DASHBOARD.name).read_bytes() == DASHBOARD.read_bytes()
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{folder}/{DASHBOARD.name}"


@pytest.mark.parametrize("job", ["notification-worker", "rabbitmq"])
def test_prometheus_scrapes_the_services_of_the_file(job: str) -> None:
    compose = _compose()
    services = compose["services"]
    prometheus = services["prometheus"]
    assert prometheus["profiles"] == ["monitoring"]
    (config,) = prometheus["configs"]
    assert compose["configs"][config["source"]]["file"] == "./deploy/prometheus/prometheus.yml"
    assert f"--config.file={config['target']}" in prometheus["command"]
    scrape = {c["job_name"]: c for c in yaml.safe_load(PROMETHEUS.read_text())["scrape_configs"]}
    if job == "notification-worker":
        (dns,) = scrape[job]["dns_sd_configs"]
        for name in dns["names"]:
            port = services[name]["environment"]["WORKER_METRICS_PORT"]
            assert dns["port"] == int(port), name
            assert services[name]["command"] == ["worker", "run"]
    else:
        (static,) = scrape[job]["static_configs"]
        (target,) = static["targets"]
        assert target.split(":")[0] in services
