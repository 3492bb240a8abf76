"""docker-compose.yml checked statically: no Docker engine runs here."""

from __future__ import annotations

from pathlib import Path

import yaml

from workers.cli import build_parser
from workers.pipeline import registry
from workers.runtime.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_parses_and_has_the_production_parts() -> None:
    services = compose()["services"]
    assert {"kafka-1", "kafka-2", "kafka-3", "postgres", "prometheus", "grafana", "http"} <= set(
        services
    )
    # Every stage the registry declares runs as its own service.
    for stage in registry.NAMES:
        assert services[stage]["command"] == ["worker", stage], stage


def test_every_loket_command_is_a_real_subcommand() -> None:
    parser = build_parser()
    loket_services = {
        name: s for name, s in compose()["services"].items() if s.get("image") == "loket:latest"
    }
    assert len(loket_services) >= 10
    for name, service in loket_services.items():
        args = parser.parse_args(service["command"])  # raises SystemExit when not a real subcommand
        assert args.command in ("worker", "migrate"), name


def test_every_loket_variable_exists_in_settings() -> None:
    fields = {f"LOKET_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose()["services"].items():
        for variable in service.get("environment", {}):
            if variable.startswith("LOKET_"):
                assert variable in fields, f"{name}: {variable} is not a setting"


def test_kafka_replication_is_three_with_two_in_sync() -> None:
    services = compose()["services"]
    brokers = [services[f"kafka-{i}"] for i in (1, 2, 3)]
    assert sorted(b["environment"]["KAFKA_NODE_ID"] for b in brokers) == [1, 2, 3]
    for broker in brokers:
        env = broker["environment"]
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == 3
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == 2
        assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == 3
        assert env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"] == "false"
    assert services["http"]["environment"]["LOKET_KAFKA_REPLICATION"] == "3"


def test_dockerfile_and_monitoring_files_exist() -> None:
    assert 'ENTRYPOINT ["loket"]' in (ROOT / "Dockerfile").read_text()
    prometheus = yaml.safe_load((ROOT / "config/prometheus/prometheus.yml").read_text())
    assert prometheus["scrape_configs"]
    assert (ROOT / "config/grafana/dashboards/loket.json").exists()
