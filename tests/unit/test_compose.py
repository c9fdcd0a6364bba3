"""compose.yaml, the worker image and the broker image, checked without a Docker engine.

``docker compose config`` runs where the compose plugin is installed. Everywhere, the file is
validated against the Compose Specification's JSON schema (vendored by check-jsonschema as
``vendor.compose-spec``), and then against what the schema cannot know: services that depend on
each other exist, the worker's variables are real settings, the migration is one-shot, the
health checks probe the metrics port, and the images' files are where the Dockerfiles copy them.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import re
import shutil
import subprocess
from importlib.resources import files
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from worker.settings import ENV_PREFIX, Settings, load_settings
from worker.tooling.demo_provider import Rule

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
SETTINGS = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def load(path: Path = COMPOSE) -> dict[str, Any]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))  # resolves `<<:` merge keys
    assert isinstance(document, dict)
    return document


def compose_spec_errors(document: dict[str, Any]) -> list[str]:
    schema_file = files("check_jsonschema.builtin_schemas.vendor") / "compose-spec.json"
    schema = json.loads(schema_file.read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path))}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def dependency_errors(document: dict[str, Any]) -> list[str]:
    """Every ``depends_on`` names a service of the file, with a condition Compose knows."""
    services = document["services"]
    errors = []
    for name, service in services.items():
        depends_on = service.get("depends_on", {})
        if isinstance(depends_on, list):
            depends_on = {dependency: {} for dependency in depends_on}
        for dependency, spec in depends_on.items():
            if dependency not in services:
                errors.append(f"{name} depends on unknown service {dependency!r}")
                continue
            condition = spec.get("condition", "service_started")
            if condition not in CONDITIONS:
                errors.append(f"{name}: unknown condition {condition!r}")
            if condition == "service_healthy" and "healthcheck" not in services[dependency]:
                errors.append(f"{name} waits for {dependency} to be healthy: no healthcheck")
    return errors


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def seconds(duration: str) -> float:
    """A Compose duration such as ``1m30s`` or ``40s``."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load()


@pytest.mark.skipif(
    shutil.which("docker") is None
    or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0,
    reason="no docker compose plugin here; the schema test below checks the file instead",
)
def test_docker_compose_accepts_the_file() -> None:
    checked = subprocess.run(
        ["docker", "compose", "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stderr


def test_the_file_follows_the_compose_specification(compose: dict[str, Any]) -> None:
    assert compose_spec_errors(compose) == []


def test_a_broken_file_fails_the_checks(compose: dict[str, Any]) -> None:
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["restrat"] = "always"
    broken["services"]["worker"]["depends_on"]["rabitmq"] = {"condition": "service_healthy"}
    assert any("restrat" in error for error in compose_spec_errors(broken))
    assert dependency_errors(broken) == ["worker depends on unknown service 'rabitmq'"]


def test_every_dependency_is_a_service_of_the_file(compose: dict[str, Any]) -> None:
    assert dependency_errors(compose) == []


def test_the_stack_has_every_part_of_the_flow(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) >= {
        "rabbitmq",
        "postgres",
        "migrate",
        "provider",
        "worker",
        "publisher",
    }


def test_worker_variables_are_real_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, service in compose["services"].items():
        unknown = {key for key in environment(service) if key.startswith(ENV_PREFIX)} - SETTINGS
        assert not unknown, f"{name}: {sorted(unknown)} are not settings of worker/settings.py"
    for key, value in environment(compose["services"]["worker"]).items():
        monkeypatch.setenv(key, value)
    settings = load_settings()  # as `worker run` reads them: a bad value raises ConfigError
    settings.require_provider_url()


def test_migrate_is_one_shot_and_runs_before_the_workers(compose: dict[str, Any]) -> None:
    services = compose["services"]
    migrate = services["migrate"]
    assert migrate["command"] == ["worker", "migrate"]
    assert migrate["restart"] == "no"
    assert "deploy" not in migrate
    assert "healthcheck" not in migrate
    assert services["worker"]["depends_on"]["migrate"] == {
        "condition": "service_completed_successfully"
    }


def test_the_worker_is_replicated_and_probed_on_its_metrics_port(
    compose: dict[str, Any],
) -> None:
    worker = compose["services"]["worker"]
    env = environment(worker)
    assert worker["command"] == ["worker", "run"]
    assert worker["deploy"]["replicas"] >= 2
    # `worker check` asks /readyz on WORKER_METRICS_PORT of the same container
    assert worker["healthcheck"]["test"] == ["CMD", "worker", "check"]
    assert int(env["WORKER_METRICS_PORT"]) > 0
    assert str(env["WORKER_METRICS_PORT"]) in map(str, worker["expose"])
    # SIGKILL must not come before the worker has finished or returned what it holds
    assert seconds(worker["stop_grace_period"]) > float(env["WORKER_SHUTDOWN_GRACE_SECONDS"])


def test_broker_and_database_have_health_checks_and_volumes(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("rabbitmq", "postgres", "worker"):
        assert services[name]["healthcheck"]["test"], name
    declared = set(compose["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name}: volume {source!r} is not declared"
    assert any(v.endswith(":/var/lib/postgresql/data") for v in services["postgres"]["volumes"])


def test_commands_name_modules_that_exist(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        command = service.get("command", [])
        if command[:2] == ["python", "-m"]:
            assert importlib.util.find_spec(command[2]) is not None, f"{name}: {command[2]}"
    provider = compose["services"]["provider"]["command"]
    Rule.from_dict(json.loads(provider[provider.index("--rule") + 1]))


def test_the_worker_logs_in_with_the_broker_user_of_the_definitions(
    compose: dict[str, Any],
) -> None:
    """The password hash in rabbitmq/definitions.json is of the compose URL's password."""
    url = urlsplit(environment(compose["services"]["worker"])["WORKER_AMQP_URL"])
    definitions = json.loads((ROOT / "rabbitmq" / "definitions.json").read_text())
    (user,) = [user for user in definitions["users"] if user["name"] == url.username]
    assert user["hashing_algorithm"] == "rabbit_password_hashing_sha256"
    salted = base64.b64decode(user["password_hash"])
    salt, digest = salted[:4], salted[4:]
    assert url.password is not None
    assert hashlib.sha256(salt + url.password.encode()).digest() == digest
    (permission,) = [p for p in definitions["permissions"] if p["user"] == url.username]
    assert permission["vhost"] == (url.path.removeprefix("/") or "/")
    exchanges = {exchange["name"]: exchange["type"] for exchange in definitions["exchanges"]}
    assert exchanges.get(Settings.model_fields["source_exchange"].default) == "topic"


def copy_sources(dockerfile: Path) -> list[str]:
    """The local sources of a Dockerfile's COPY instructions (not ``--from`` stages)."""
    sources = []
    for line in dockerfile.read_text().splitlines():
        words = line.split()
        if words[:1] == ["COPY"] and not any(w.startswith("--from") for w in words):
            sources += [w for w in words[1:-1] if not w.startswith("--")]
    return sources


def test_the_images_copy_files_that_exist_and_are_not_ignored(compose: dict[str, Any]) -> None:
    ignored = {
        line.strip().rstrip("/")
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        context = ROOT / service["build"]["context"]
        dockerfile = context / service["build"].get("dockerfile", "Dockerfile")
        assert dockerfile.is_file(), f"{name}: no {dockerfile}"
        for source in copy_sources(dockerfile):
            assert (context / source).exists(), f"{name}: COPY {source}: no such file"
            if context == ROOT:
                assert source.rstrip("/") not in ignored, f"{name}: {source} is .dockerignored"


def test_every_config_file_exists(compose: dict[str, Any]) -> None:
    for name, config in compose["configs"].items():
        assert (ROOT / config["file"]).is_file(), name
    for name, service in compose["services"].items():
        for config in service.get("configs", []):
            assert config["source"] in compose["configs"], f"{name}: {config['source']}"


def test_the_default_broker_is_a_current_rabbitmq_without_the_plugin(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    broker = services["rabbitmq"]
    assert "build" not in broker
    assert "profiles" not in broker
    version = re.fullmatch(r"rabbitmq:(\d+)\.(\d+)(?:\.\d+)?-management", broker["image"])
    assert version, broker["image"]
    assert (int(version[1]), int(version[2])) >= (4, 2)
    mounted = {
        config["target"]: compose["configs"][config["source"]]["file"]
        for config in broker["configs"]
    }
    conf = mounted["/etc/rabbitmq/conf.d/90-notifications.conf"]
    assert conf == "./rabbitmq/rabbitmq.conf"
    (definitions,) = re.findall(
        r"^load_definitions = (\S+)$", (ROOT / conf).read_text(), re.MULTILINE
    )
    assert mounted[definitions] == "./rabbitmq/definitions.json"
    plugins = (ROOT / mounted["/etc/rabbitmq/enabled_plugins"]).read_text()
    assert "rabbitmq_prometheus" in plugins
    assert "delayed" not in plugins
    for name in ("worker", "publisher", "migrate", "provider"):
        assert "profiles" not in services[name], name
    assert environment(services["worker"])["WORKER_DELAY_BACKEND"] == "ttl"


def test_the_plugin_is_an_opt_in_profile_on_its_own_broker(compose: dict[str, Any]) -> None:
    services = compose["services"]
    opt_in = {name for name, s in services.items() if "delayed-plugin" in s.get("profiles", [])}
    assert opt_in == {"rabbitmq-delayed", "worker-delayed", "publisher-delayed"}
    assert services["rabbitmq-delayed"]["build"]["context"] == "./rabbitmq"
    worker = environment(services["worker-delayed"])
    assert worker["WORKER_DELAY_BACKEND"] == "plugin"
    assert urlsplit(worker["WORKER_AMQP_URL"]).hostname == "rabbitmq-delayed"
    publisher = environment(services["publisher-delayed"])
    assert urlsplit(publisher["WORKER_AMQP_URL"]).hostname == "rabbitmq-delayed"
    assert services["worker-delayed"]["depends_on"]["rabbitmq-delayed"] == {
        "condition": "service_healthy"
    }
    # the rest of the stack is shared, and the default stack does not need this profile
    for name, service in services.items():
        if name not in opt_in:
            assert not set(service.get("depends_on", {})) & opt_in, name


def test_the_broker_loads_the_definitions_it_is_given() -> None:
    dockerfile = (ROOT / "rabbitmq" / "Dockerfile").read_text()
    conf = (ROOT / "rabbitmq" / "rabbitmq.conf").read_text()
    (target,) = re.findall(r"^COPY .*definitions\.json (\S+)$", dockerfile, re.MULTILINE)
    assert re.search(rf"^load_definitions = {re.escape(target)}$", conf, re.MULTILINE)
    assert "rabbitmq_delayed_message_exchange" in dockerfile
    assert "rabbitmq_management" in dockerfile
    (image,) = re.findall(
        r"^ARG RABBITMQ_IMAGE=rabbitmq:(\d+)\.(\d+)\.\d+-management$", dockerfile, re.MULTILINE
    )
    (plugin,) = re.findall(
        r"^ARG DELAYED_MESSAGE_EXCHANGE_VERSION=(\d+)\.(\d+)\.\d+$", dockerfile, re.MULTILINE
    )
    # the plugin is built per RabbitMQ minor series: the two must move together
    assert image == plugin
    assert int(image[0]) >= 4


def consult(path: Path) -> str:
    """An Erlang term file as the broker reads it (``file:consult``), printed back on one line."""
    erl = shutil.which("erl")
    if erl is None:
        pytest.skip("no Erlang runtime here")
    script = f'{{ok, T}} = file:consult("{path}"), io:format("~w", [T]), halt().'
    done = subprocess.run(
        [erl, "-noshell", "-eval", script], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def test_cluster_nodes_resend_a_lost_dead_letter_hop_after_10_s(
    compose: dict[str, Any], tmp_path: Path
) -> None:
    """A retry's hop between quorum delay levels whose confirm died with a node is resent after
    the broker's dead-letter confirm timeout: 10 s on every cluster we ship, not 180 s."""
    node = compose["services"]["rabbitmq-1"]
    (mount,) = [c for c in node["configs"] if c["target"] == "/etc/rabbitmq/advanced.config"]
    advanced = ROOT / compose["configs"][mount["source"]]["file"]
    operator = yaml.safe_load((ROOT / "deploy/k8s/cluster/rabbitmqcluster.yaml").read_text())
    (tmp_path / "operator.config").write_text(operator["spec"]["rabbitmq"]["advancedConfig"])
    for path in (advanced, tmp_path / "operator.config"):
        assert "{dead_letter_worker_publisher_confirm_timeout,10000}" in consult(path)
