"""deploy/k8s/cluster: the RabbitmqCluster of the Cluster Operator (a CRD, which the core
schemas of tests/unit/test_k8s.py cannot validate), checked for what the worker relies on."""

from __future__ import annotations

from pathlib import Path

import yaml

MANIFEST = (
    Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "cluster" / "rabbitmqcluster.yaml"
)


def test_a_three_node_cluster_of_the_operator() -> None:
    (document,) = list(yaml.safe_load_all(MANIFEST.read_text(encoding="utf-8")))
    assert document["apiVersion"] == "rabbitmq.com/v1beta1"
    assert document["kind"] == "RabbitmqCluster"
    spec = document["spec"]
    assert spec["replicas"] == 3  # a quorum queue survives one node lost of three
    assert spec["persistence"]["storage"]
    config = spec["rabbitmq"]["additionalConfig"]
    assert "default_queue_type = quorum" in config
    # the operator's image pin and the compose broker's RabbitMQ minor move together
    dockerfile = (MANIFEST.parents[3] / "rabbitmq" / "Dockerfile").read_text()
    minor = spec["image"].split(":")[1].rsplit(".", 1)[0]
    assert f"ARG RABBITMQ_IMAGE=rabbitmq:{minor}." in dockerfile


def test_not_part_of_the_worker_kustomization() -> None:
    kustomization = yaml.safe_load((MANIFEST.parents[1] / "kustomization.yaml").read_text())
    assert not any("cluster" in str(resource) for resource in kustomization["resources"])
