"""The Helm chart in helm/metergate: rendered and linted by real Helm (helm-python-sdk, no helm binary).

Owns the checks that what the chart deploys is what the service expects: the
probes hit its health routes, its secrets come from Secret refs, its config and
rate cards are mounted where `metergate serve` reads them (the cards as a
directory, so a ConfigMap edit hot-reloads them), and the pod is locked down.
"""

from __future__ import annotations

import asyncio
import io
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import helm_python as helm
import pytest
from ruamel.yaml import YAML

from pricing import load_rate_cards
from proxy.config import load_config
from proxy.ratecards import RateCardRegistry

REPO = Path(__file__).resolve().parents[2]
CHART_DIR = REPO / "helm" / "metergate"
RELEASE = "mg"


@dataclass(frozen=True)
class Rendered:
    """Every object one render produced, parsed."""

    objects: list[dict[str, Any]]

    def kinds(self) -> list[str]:
        return sorted(obj["kind"] for obj in self.objects)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [obj for obj in self.all(kind) if name is None or obj["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {[o['metadata']['name'] for o in found]}"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        return self.one("Deployment")["spec"]["template"]["spec"]

    @property
    def container(self) -> dict[str, Any]:
        (container,) = self.pod["containers"]
        return container

    def env(self) -> dict[str, dict[str, Any]]:
        return {entry["name"]: entry for entry in self.container.get("env", [])}

    def config_text(self) -> str:
        return self.one("ConfigMap", f"{RELEASE}-metergate-config")["data"]["metergate.yaml"]

    def ratecards(self) -> dict[str, str]:
        return self.one("ConfigMap", f"{RELEASE}-metergate-ratecards")["data"]


@pytest.fixture(scope="module")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


def render(chart: helm.Chart, values: dict[str, Any] | None = None) -> Rendered:
    manifests = chart.render(values=values, name=RELEASE, namespace="billing", is_install=True)
    yaml = YAML(typ="safe", pure=True)
    objects = [
        obj
        for path, text in sorted(manifests.items())
        if path.endswith((".yaml", ".yml"))
        for obj in yaml.load_all(io.StringIO(text))
        if obj
    ]
    return Rendered(objects)


@pytest.fixture(scope="module")
def default(chart: helm.Chart) -> Rendered:
    return render(chart)


def mounted_at(rendered: Rendered, mount_path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The container's volumeMount at `mount_path` and the pod volume behind it."""
    (mount,) = [m for m in rendered.container["volumeMounts"] if m["mountPath"] == mount_path]
    (volume,) = [v for v in rendered.pod["volumes"] if v["name"] == mount["name"]]
    return mount, volume


def config_path_argument(rendered: Rendered) -> PurePosixPath:
    args = rendered.container["args"]
    return PurePosixPath(args[args.index("--config") + 1])


def write_mounted_files(rendered: Rendered, root: Path) -> Path:
    """Lay the rendered ConfigMaps out under `root` as the pod sees them; returns the config file."""
    config_file = config_path_argument(rendered)
    mount, volume = mounted_at(rendered, str(config_file))
    assert volume["configMap"]["name"] == f"{RELEASE}-metergate-config"
    local_config = root / config_file.relative_to("/")
    local_config.parent.mkdir(parents=True)
    local_config.write_text(rendered.config_text())
    cards_mount = next(m for m in rendered.container["volumeMounts"] if m["name"] == "ratecards")
    local_cards = root / PurePosixPath(cards_mount["mountPath"]).relative_to("/")
    local_cards.mkdir(parents=True)
    for name, text in rendered.ratecards().items():
        (local_cards / name).write_text(text)
    return local_config


def kubelet_publish(mount: Path, files: dict[str, str], generation: str) -> None:
    """Update a ConfigMap volume the way the kubelet does: a new timestamped dir, an atomic `..data` swap."""
    fresh = mount / f"..{generation}"
    fresh.mkdir()
    for name, text in files.items():
        (fresh / name).write_text(text)
    previous = (mount / "..data").resolve() if (mount / "..data").is_symlink() else None
    staging = mount / "..data_tmp"
    staging.symlink_to(fresh.name)
    os.replace(staging, mount / "..data")
    for name in files:
        if not (mount / name).is_symlink():
            (mount / name).symlink_to(f"..data/{name}")
    if previous is not None:
        shutil.rmtree(previous)


# --- Helm itself ---


def test_chart_lints_without_warnings_in_strict_mode() -> None:
    report = helm.lint(CHART_DIR, strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert report["errors"] == [] and problems == [], report


def test_default_render_has_exactly_the_expected_objects(default: Rendered) -> None:
    assert default.kinds() == sorted(
        ["ConfigMap", "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "ServiceAccount"]
    )


# --- what the service reads ---


def test_container_serves_on_all_interfaces_with_the_mounted_config(default: Rendered) -> None:
    args = default.container["args"]
    assert args[0] == "serve"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert int(args[args.index("--port") + 1]) == default.container["ports"][0]["containerPort"] == 8080
    assert config_path_argument(default) == PurePosixPath("/etc/metergate/metergate.yaml")


def test_liveness_probe_is_healthz_on_the_served_port(default: Rendered) -> None:
    probe = default.container["livenessProbe"]["httpGet"]
    assert probe == {"path": "/healthz", "port": "http"}
    assert default.container["ports"][0]["name"] == "http"


def test_readiness_probe_is_readyz_on_the_served_port(default: Rendered) -> None:
    probe = default.container["readinessProbe"]["httpGet"]
    assert probe == {"path": "/readyz", "port": "http"}


def test_ratecards_configmap_is_mounted_as_a_directory_where_the_config_points(default: Rendered, tmp_path: Path) -> None:
    mount, volume = mounted_at(default, "/etc/metergate/ratecards")
    assert "subPath" not in mount, "a subPath mount never sees ConfigMap updates"
    assert volume["configMap"]["name"] == f"{RELEASE}-metergate-ratecards"
    config = load_config(write_mounted_files(default, tmp_path), environ={})
    assert config.resolve(config.ratecards_dir) == tmp_path / "etc/metergate/ratecards"


def test_rendered_config_and_cards_load_in_the_service(default: Rendered, tmp_path: Path) -> None:
    config = load_config(write_mounted_files(default, tmp_path), environ={})
    cards = load_rate_cards(config.resolve(config.ratecards_dir), upstreams=set(config.upstreams))
    assert sorted(card.ref for card in cards.all_cards()) == ["default@1", "pro@1"]
    assert cards.tiers == {"default": "default", "pro": "pro"}
    assert config.redis_url is None and config.admin_keys == [], "secrets belong in env, not in the ConfigMap"


def test_bundled_cards_are_the_repository_cards(default: Rendered) -> None:
    repository = {p.name: p.read_text() for p in sorted((REPO / "config" / "ratecards").glob("*.yaml"))}
    bundled = {p.name: p.read_text() for p in sorted((CHART_DIR / "files" / "ratecards").glob("*.yaml"))}
    assert bundled == repository, "helm/metergate/files/ratecards drifted from config/ratecards: copy them again"
    rendered = {name: "\n".join(line.rstrip() for line in text.splitlines()) for name, text in default.ratecards().items()}
    assert rendered == {name: "\n".join(line.rstrip() for line in text.splitlines()) for name, text in repository.items()}


def test_cards_given_in_values_replace_the_bundled_ones(chart: helm.Chart) -> None:
    card = "id: solo\nversion: 3\neffective_from: 2026-01-01\ncurrency: USD\nmodels: {}\n"
    rendered = render(chart, {"ratecards": {"files": {"solo.yaml": card}}})
    assert rendered.ratecards() == {"solo.yaml": card}


def test_an_existing_cards_configmap_is_mounted_instead_of_one_of_ours(chart: helm.Chart) -> None:
    rendered = render(chart, {"ratecards": {"existingConfigMap": "team-cards"}})
    _, volume = mounted_at(rendered, "/etc/metergate/ratecards")
    assert volume["configMap"]["name"] == "team-cards"
    assert [cm["metadata"]["name"] for cm in rendered.all("ConfigMap")] == [f"{RELEASE}-metergate-config"]


async def test_a_configmap_edit_reaches_the_running_card_watcher(default: Rendered, tmp_path: Path) -> None:
    mount = tmp_path / "ratecards"
    mount.mkdir()
    kubelet_publish(mount, default.ratecards(), "2026_01_01_00_00_00.1")
    registry = RateCardRegistry(mount, {"openai"})
    assert {card.ref for card in registry.current.all_cards()} == {"default@1", "pro@1"}
    edited = dict(default.ratecards())
    edited["default.yaml"] = edited["default.yaml"].replace("version: 1\n", "version: 2\n", 1)
    watcher = asyncio.create_task(registry.watch(0.02))
    await asyncio.sleep(0)  # let the watcher record the files as they are before the edit
    try:
        kubelet_publish(mount, edited, "2026_01_01_00_05_00.2")
        deadline = asyncio.get_running_loop().time() + 5
        while "default@2" not in {card.ref for card in registry.current.all_cards()}:
            assert asyncio.get_running_loop().time() < deadline, "the watcher never saw the ..data swap"
            await asyncio.sleep(0.02)
    finally:
        watcher.cancel()


# --- secrets ---


def test_core_secrets_come_from_secret_key_refs(default: Rendered) -> None:
    env = default.env()
    refs = {name: env[name]["valueFrom"]["secretKeyRef"] for name in ("METERGATE_REDIS_URL", "METERGATE_ADMIN_KEY", "METERGATE_OPERATOR_KEY")}
    assert refs == {
        "METERGATE_REDIS_URL": {"name": f"{RELEASE}-metergate", "key": "redis-url"},
        "METERGATE_ADMIN_KEY": {"name": f"{RELEASE}-metergate", "key": "admin-keys"},
        "METERGATE_OPERATOR_KEY": {"name": f"{RELEASE}-metergate", "key": "operator-keys", "optional": True},
    }


def test_the_env_names_the_chart_sets_are_the_ones_the_service_reads(default: Rendered, tmp_path: Path) -> None:
    environ = {name: f"from-{name}" for name in default.env()}
    environ["METERGATE_REDIS_URL"] = "redis://redis.billing:6379/0"
    config = load_config(write_mounted_files(default, tmp_path), environ=environ)
    assert config.redis_url == "redis://redis.billing:6379/0"
    assert config.admin_keys == ["from-METERGATE_ADMIN_KEY"]
    assert config.operator_keys == ["from-METERGATE_OPERATOR_KEY"]
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OPENAI_API_KEY", environ["OPENAI_API_KEY"])
        assert config.upstreams["openai"].api_key == "from-OPENAI_API_KEY"


def test_no_secret_is_created_or_written_in_plain_by_default(default: Rendered) -> None:
    assert default.all("Secret") == []
    assert [entry["name"] for entry in default.env().values() if "value" in entry] == []


def test_secrets_name_points_every_ref_at_another_secret(chart: helm.Chart) -> None:
    rendered = render(chart, {"secrets": {"name": "metergate-prod"}})
    names = {entry["valueFrom"]["secretKeyRef"]["name"] for entry in rendered.env().values()}
    assert names == {"metergate-prod"}


def test_each_upstream_key_variable_gets_its_own_secret_ref(chart: helm.Chart) -> None:
    upstreams = {
        "openai": {"base_url": "https://api.openai.com/v1", "api_key_env": "OPENAI_API_KEY"},
        "groq": {"base_url": "https://api.groq.com/openai/v1", "api_key_env": "GROQ_API_KEY"},
    }
    rendered = render(chart, {"config": {"upstreams": upstreams}, "secrets": {"upstreamApiKeys": {"GROQ_API_KEY": {"name": "groq", "key": "token"}}}})
    env = rendered.env()
    assert env["OPENAI_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-metergate", "key": "openai-api-key"}
    assert env["GROQ_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "groq", "key": "token"}


def test_jwt_secret_goes_into_the_variable_the_config_names(chart: helm.Chart, default: Rendered) -> None:
    assert "METERGATE_JWT_SECRET" not in default.env()
    rendered = render(chart, {"config": {"jwt": {"hs256_secret_env": "METERGATE_JWT_SECRET"}}})
    assert rendered.env()["METERGATE_JWT_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-metergate", "key": "jwt-secret"}


def test_stripe_secrets_are_referenced_only_when_stripe_is_configured(chart: helm.Chart, default: Rendered) -> None:
    assert "STRIPE_SECRET_KEY" not in default.env() and "STRIPE_WEBHOOK_SECRET" not in default.env()
    rendered = render(chart, {"config": {"stripe": {"currency": "usd"}}})
    env = rendered.env()
    assert env["STRIPE_SECRET_KEY"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-metergate", "key": "stripe-secret-key"}
    assert env["STRIPE_WEBHOOK_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": f"{RELEASE}-metergate", "key": "stripe-webhook-secret"}


def test_stripe_secrets_follow_the_configured_variable_names(chart: helm.Chart) -> None:
    rendered = render(chart, {"config": {"stripe": {"secret_key_env": "PAY_KEY", "webhook_secret_env": "PAY_HOOK"}}})
    assert {"PAY_KEY", "PAY_HOOK"} <= set(rendered.env())


def test_the_ledger_database_url_comes_from_the_secret_by_default(chart: helm.Chart, default: Rendered) -> None:
    # Each pod's own SQLite file would be history lost with the pod: the chart asks for a database.
    assert default.env()["METERGATE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "mg-metergate", "key": "database-url"}
    rendered = render(chart, {"secrets": {"databaseUrl": {"name": "pg", "key": "url"}}})
    assert rendered.env()["METERGATE_DATABASE_URL"]["valueFrom"]["secretKeyRef"] == {"name": "pg", "key": "url"}
    off = render(chart, {"secrets": {"databaseUrl": {"enabled": False}}})
    assert "METERGATE_DATABASE_URL" not in off.env()


def test_the_statement_secret_is_an_optional_ref(default: Rendered) -> None:
    assert default.env()["METERGATE_STATEMENT_SECRET"]["valueFrom"]["secretKeyRef"] == {
        "name": "mg-metergate", "key": "statement-secret", "optional": True}


# --- the pod ---


def test_pod_runs_non_root_with_a_read_only_root_and_no_capabilities(default: Rendered) -> None:
    pod, container = default.pod["securityContext"], default.container["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0
    assert container["runAsNonRoot"] is True
    assert container["readOnlyRootFilesystem"] is True
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"] == {"drop": ["ALL"]}
    assert default.pod["automountServiceAccountToken"] is False


def test_tmp_is_a_writable_scratch_volume(default: Rendered) -> None:
    mount, volume = mounted_at(default, "/tmp")
    assert "emptyDir" in volume and not mount.get("readOnly", False)


def test_container_has_resource_requests_and_a_memory_limit(default: Rendered) -> None:
    resources = default.container["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"} and "memory" in resources["limits"]


def test_rollout_never_drops_below_the_desired_ready_pods(default: Rendered) -> None:
    strategy = default.one("Deployment")["spec"]["strategy"]
    assert strategy["type"] == "RollingUpdate" and strategy["rollingUpdate"]["maxUnavailable"] == 0


def test_termination_grace_covers_the_prestop_sleep_and_the_stream_drain(default: Rendered, tmp_path: Path) -> None:
    sleep = default.container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep" and int(sleep[1]) > 0
    config = load_config(write_mounted_files(default, tmp_path), environ={})
    assert default.pod["terminationGracePeriodSeconds"] >= 120
    assert default.pod["terminationGracePeriodSeconds"] > int(sleep[1]) + config.shutdown_grace_seconds


def test_a_grace_period_shorter_than_the_drain_refuses_to_render(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render(chart, {"terminationGracePeriodSeconds": 30, "config": {"shutdown_grace_seconds": 60}})


def test_a_config_change_rolls_the_pods(chart: helm.Chart, default: Rendered) -> None:
    changed = render(chart, {"config": {"hold_ttl_seconds": 900}})
    key = "checksum/config"
    before = default.one("Deployment")["spec"]["template"]["metadata"]["annotations"][key]
    assert changed.one("Deployment")["spec"]["template"]["metadata"]["annotations"][key] != before


def test_a_card_change_does_not_roll_the_pods(chart: helm.Chart, default: Rendered) -> None:
    card = "id: solo\nversion: 1\neffective_from: 2026-01-01\ncurrency: USD\nmodels: {}\n"
    changed = render(chart, {"ratecards": {"files": {"solo.yaml": card}}})
    assert changed.one("Deployment")["spec"]["template"] == default.one("Deployment")["spec"]["template"]


# --- scaling, disruption, monitoring ---


def test_hpa_scales_the_deployment_on_cpu_and_owns_the_replica_count(default: Rendered) -> None:
    hpa = default.one("HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": default.one("Deployment")["metadata"]["name"]}
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert hpa["minReplicas"] >= 2
    assert "replicas" not in default.one("Deployment")["spec"], "a fixed count would fight the HPA on every upgrade"


def test_without_the_hpa_the_deployment_sets_its_replicas(chart: helm.Chart) -> None:
    rendered = render(chart, {"autoscaling": {"enabled": False}, "replicaCount": 3})
    assert rendered.all("HorizontalPodAutoscaler") == []
    assert rendered.one("Deployment")["spec"]["replicas"] == 3


def test_pdb_covers_the_deployments_pods(default: Rendered) -> None:
    pdb = default.one("PodDisruptionBudget")["spec"]
    pod_labels = default.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pdb["maxUnavailable"] == 1
    assert pdb["selector"]["matchLabels"].items() <= pod_labels.items()


def test_service_selects_the_pods_on_the_http_port(default: Rendered) -> None:
    service = default.one("Service")["spec"]
    pod_labels = default.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["selector"].items() <= pod_labels.items()
    assert [(p["name"], p["targetPort"]) for p in service["ports"]] == [("http", "http")]


def test_servicemonitor_is_off_by_default(default: Rendered) -> None:
    assert default.all("ServiceMonitor") == []


def test_servicemonitor_scrapes_metrics_on_the_service_port_when_enabled(chart: helm.Chart) -> None:
    rendered = render(chart, {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}})
    monitor = rendered.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert [(e["port"], e["path"]) for e in monitor["spec"]["endpoints"]] == [("http", "/metrics")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= rendered.one("Service")["metadata"]["labels"].items()
