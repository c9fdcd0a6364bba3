"""deploy/k8s without a cluster: the Kubernetes objects against the API's own schemas
(kubernetes-validate, strict: an unknown field fails), and the references between the objects
that no schema checks: KEDA scales the Deployment on the worker's queue with the worker's
broker URL, the variables are real settings, the probes hit the metrics port, and the drain
fits in the termination grace period."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from worker.settings import ENV_PREFIX, Settings, load_settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30.0"  # the oldest minor we claim; KEDA 2.16+ needs 1.29+
SETTINGS = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
API_VERSIONS = {
    "ConfigMap": "v1",
    "Secret": "v1",
    "Deployment": "apps/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
    "PodMonitor": "monitoring.coreos.com/v1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
CUSTOM_KINDS = {"ScaledObject", "TriggerAuthentication", "PodMonitor", "Kustomization"}


def documents() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert isinstance(document, dict), f"{path.name}: not a mapping"
            found.append((path.name, document))
    return found


def one(kind: str) -> dict[str, Any]:
    (document,) = [doc for _, doc in documents() if doc["kind"] == kind]
    return document


def worker_container() -> dict[str, Any]:
    (container,) = one("Deployment")["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def secret_keys(container: dict[str, Any]) -> dict[str, str]:
    """``{variable: secret key}`` of a container's env taken from the Secret."""
    return {
        env["name"]: env["valueFrom"]["secretKeyRef"]["key"]
        for env in container.get("env", [])
        if "secretKeyRef" in env.get("valueFrom", {})
    }


def test_every_object_has_a_known_kind_api_version_and_name() -> None:
    kinds = []
    for name, document in documents():
        assert API_VERSIONS.get(document["kind"]) == document["apiVersion"], name
        if document["kind"] != "Kustomization":
            assert document["metadata"]["name"], name
        kinds.append(document["kind"])
    assert sorted(kinds) == sorted(API_VERSIONS)


@pytest.mark.parametrize(
    ("file", "document"),
    [(f, d) for f, d in documents() if d["kind"] not in CUSTOM_KINDS],
    ids=lambda value: value if isinstance(value, str) else value["kind"],
)
def test_kubernetes_objects_match_the_api_schema(file: str, document: dict[str, Any]) -> None:
    kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_a_misspelt_field_fails_the_schema_check() -> None:
    broken = json.loads(json.dumps(one("Deployment")))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 45
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_applies_every_manifest_but_the_example_secret() -> None:
    resources = set(one("Kustomization")["resources"])
    manifests = {path.name for path in K8S.glob("*.yaml")}
    assert resources == manifests - {"kustomization.yaml", "secret.example.yaml"}


def test_the_scaled_object_scales_the_worker_on_its_ingress_and_work_queues() -> None:
    deployment, config = one("Deployment"), one("ConfigMap")["data"]
    scaled = one("ScaledObject")["spec"]
    assert scaled["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert "replicas" not in deployment["spec"], "KEDA owns the replica count"
    assert 1 <= scaled["minReplicaCount"] <= scaled["maxReplicaCount"]
    triggers = scaled["triggers"]
    queue = config["WORKER_QUEUE"]
    assert {t["metadata"]["queueName"] for t in triggers} == {f"{queue}.ingress", queue}
    authentication = one("TriggerAuthentication")
    for trigger in triggers:
        assert trigger["type"] == "rabbitmq"
        assert trigger["metadata"]["mode"] == "QueueLength"
        assert float(trigger["metadata"]["value"]) > 0
        assert trigger["authenticationRef"]["name"] == authentication["metadata"]["name"]
    (host,) = authentication["spec"]["secretTargetRef"]
    assert host["parameter"] == "host"
    # KEDA reads the very URL the worker connects with
    (secret_ref,) = [
        env["valueFrom"]["secretKeyRef"]
        for env in worker_container()["env"]
        if env["name"] == "WORKER_AMQP_URL"
    ]
    assert (host["name"], host["key"]) == (secret_ref["name"], secret_ref["key"])


def test_the_variables_are_real_settings_and_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    config = one("ConfigMap")
    secret = one("Secret")
    container = worker_container()
    assert container["envFrom"] == [{"configMapRef": {"name": config["metadata"]["name"]}}]
    from_secret = secret_keys(container)
    assert set(config["data"]) | set(from_secret) <= SETTINGS
    for variable, key in from_secret.items():
        monkeypatch.setenv(variable, secret["stringData"][key])
    for variable, value in config["data"].items():
        monkeypatch.setenv(variable, value)
    settings = load_settings()  # as `worker run` would read them in the pod
    settings.require_provider_url()
    assert settings.amqp_url.startswith("amqps://")
    assert "ssl=require" in settings.database_url


def test_every_pod_migrates_before_its_worker_starts() -> None:
    """An init container runs `worker migrate` with the worker's image and database secret,
    so a rollout never starts a replica against an older schema; no Job to run by hand."""
    pod = one("Deployment")["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert init["command"] == ["worker", "migrate"]
    assert init["image"] == worker_container()["image"]
    database = secret_keys(worker_container())["WORKER_DATABASE_URL"]
    assert secret_keys(init) == {"WORKER_DATABASE_URL": database}
    assert {e["name"]: e.get("value") for e in init["env"]}["WORKER_LOG_FORMAT"] == "json"
    assert "Job" not in {document["kind"] for _, document in documents()}


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    """The checks of Pod Security "restricted" that the manifests decide."""
    pod = one("Deployment")["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["runAsUser"] != 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert not pod.get("hostNetwork")
    assert not pod.get("hostPID")
    assert not pod.get("volumes")
    for container in _containers(pod):
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"]["drop"] == ["ALL"], container["name"]
        assert not context.get("privileged"), container["name"]
        assert context.get("readOnlyRootFilesystem") is True, container["name"]
        assert "seccompProfile" not in context or context["seccompProfile"]["type"] in {
            "RuntimeDefault",
            "Localhost",
        }
        assert container["resources"]["limits"]["memory"], container["name"]


def test_the_probes_and_the_scrape_use_the_metrics_port() -> None:
    deployment = one("Deployment")
    container = worker_container()
    metrics_port = int(one("ConfigMap")["data"]["WORKER_METRICS_PORT"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert ports.get(get["port"], get["port"]) == metrics_port, probe
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == metrics_port
    (endpoint,) = one("PodMonitor")["spec"]["podMetricsEndpoints"]
    assert ports[endpoint["port"]] == metrics_port
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert one("PodMonitor")["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_the_drain_fits_in_the_termination_grace_period() -> None:
    grace = one("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    drain = float(one("ConfigMap")["data"]["WORKER_SHUTDOWN_GRACE_SECONDS"])
    # the drain, then closing connections and the provider session, before SIGKILL
    assert grace >= drain + 10
