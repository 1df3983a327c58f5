"""The shipped deployment files agree with the daemon they deploy: deploy/kubernetes/ (probe routes, ports,
the termination grace, the config it mounts, the metrics the endpoint picker is pointed at) and
deploy/nginx/lllmsd.conf (timeouts and limits against the config's defaults). These manifests have not
run on a cluster; tests/test_nginx.py runs the nginx file for real."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from lllmsd.api.auth import OPEN_PATHS
from lllmsd.app import create_app
from lllmsd.config import DaemonConfig, ModelBase, parse_config
from lllmsd.server import CANCEL_TIMEOUT
from tests.api.test_metrics import scrape
from tests.conftest import AppFactory, fake_model, make_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def manifests(name: str) -> dict[str, dict[str, Any]]:
    """The documents of a manifest file, by kind (each kind appears once)."""
    documents = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes" / name).read_text()) if d]
    by_kind = {d["kind"]: d for d in documents}
    assert len(by_kind) == len(documents)
    return by_kind


@pytest.fixture(scope="module")
def lllmsd() -> dict[str, dict[str, Any]]:
    return manifests("lllmsd.yaml")


@pytest.fixture(scope="module")
def mounted_config(lllmsd: dict[str, dict[str, Any]]) -> DaemonConfig:
    # the config the pods run, through the daemon's own validation (its engine need not be installed here)
    return parse_config(yaml.safe_load(lllmsd["ConfigMap"]["data"]["config.yaml"]), check_installed=False)


def container(lllmsd: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (only,) = lllmsd["Deployment"]["spec"]["template"]["spec"]["containers"]
    return only


def test_the_pods_probe_routes_the_daemon_serves_without_a_key(lllmsd: dict[str, dict[str, Any]]) -> None:
    routes = {r.resource.canonical for r in create_app(make_config()).router.routes() if r.method == "GET"}
    pod = container(lllmsd)
    paths = {name: pod[name]["httpGet"]["path"] for name in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert paths == {"startupProbe": "/health", "livenessProbe": "/health", "readinessProbe": "/ready"}
    for path in paths.values():
        assert path in routes
        assert path in OPEN_PATHS  # kubelet probes carry no credentials


def test_ports_and_grace_agree_with_the_mounted_config(
    lllmsd: dict[str, dict[str, Any]], mounted_config: DaemonConfig
) -> None:
    pod = container(lllmsd)
    (port,) = pod["ports"]
    assert port["containerPort"] == mounted_config.listen.port
    assert mounted_config.listen.host == "0.0.0.0"  # reachable on the pod's address, not only loopback
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert pod[probe]["httpGet"]["port"] == port["name"]
    assert lllmsd["Service"]["spec"]["ports"][0]["targetPort"] == port["name"]
    selector = lllmsd["Service"]["spec"]["selector"]
    assert selector.items() <= lllmsd["Deployment"]["spec"]["template"]["metadata"]["labels"].items()
    # the kubelet kills the pod after this grace: the drain (shutdown_grace) and the cancel must fit in it
    grace = lllmsd["Deployment"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > mounted_config.shutdown_grace + CANCEL_TIMEOUT
    assert pod["args"] == ["serve", "-c", "/etc/lllmsd/config.yaml"]
    mounts = {m["name"]: m["mountPath"] for m in pod["volumeMounts"]}
    assert mounts["config"] == "/etc/lllmsd"
    assert mounts["cache"] == str(mounted_config.cache_dir)
    assert all(m.min_instances > 0 for m in mounted_config.models.values())  # what /ready waits for


def test_the_inference_pool_selects_the_pods_and_reads_metrics_lllmsd_serves(
    lllmsd: dict[str, dict[str, Any]], mounted_config: DaemonConfig
) -> None:
    pool = manifests("inference-pool.yaml")
    spec = pool["InferencePool"]["spec"]
    labels = lllmsd["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert spec["targetPorts"] == [{"number": mounted_config.listen.port}]
    assert spec["endpointPickerRef"]["name"] == pool["Service"]["metadata"]["name"]
    (epp,) = pool["Deployment"]["spec"]["template"]["spec"]["containers"]
    flags = dict(arg.removeprefix("--").split("=", 1) for arg in epp["args"] if "=" in arg)
    assert flags["lora-info-metric"] == ""
    metrics = {name: flags[name] for name in flags if name.endswith("-metric") and flags[name]}
    assert set(metrics) == {
        "total-queued-requests-metric",
        "total-running-requests-metric",
        "kv-cache-usage-percentage-metric",
    }
    for spec_text in metrics.values():
        match = re.fullmatch(r"(\w+)\{model=([^}]+)\}", spec_text)
        assert match, spec_text
        assert match.group(2) in mounted_config.models


async def test_the_metrics_the_picker_reads_are_served(start_app: AppFactory, mounted_config: DaemonConfig) -> None:
    epp = manifests("inference-pool.yaml")["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    wanted = [re.fullmatch(r"--[\w-]+-metric=(\w+)\{model=([^}]+)\}", a) for a in epp["args"]]
    client = await start_app(make_config({model: fake_model() for model in mounted_config.models}))
    samples = await scrape(client)
    for match in filter(None, wanted):
        name, model = match.groups()
        assert (name, frozenset({("model", model)})) in samples, name


# ------------------------------------------------------------------------------------------- nginx


def nginx_setting(name: str) -> str:
    found = re.findall(rf"^\s*{name}\s+([^;]+);", (DEPLOY / "nginx" / "lllmsd.conf").read_text(), re.MULTILINE)
    assert len(found) == 1, (name, found)
    return str(found[0]).strip()


def seconds(value: str) -> float:
    return float(value.removesuffix("s"))


def test_nginx_waits_longer_than_a_request_may_queue_and_run() -> None:
    defaults = ModelBase.model_fields
    longest = defaults["queue_timeout"].default + 600  # max_request_seconds' default for text models
    assert parse_config({"models": {"m": fake_model()}}).models["m"].request_seconds() == 600
    assert seconds(nginx_setting("proxy_read_timeout")) > longest
    assert seconds(nginx_setting("proxy_send_timeout")) > longest


def test_nginx_limits_match_the_daemon_defaults() -> None:
    daemon = DaemonConfig.model_fields
    assert nginx_setting("client_max_body_size") == f"{daemon['max_body_size'].default // (1024 * 1024)}m"
    # nginx closes its idle connections to a daemon before the daemon would close them under it
    assert seconds(nginx_setting("keepalive_timeout")) < daemon["client_timeout"].default
    # the hash key is the header lllmsd routes by
    header = daemon["session_header"].default
    text = (DEPLOY / "nginx" / "lllmsd.conf").read_text()
    assert f"map $http_{header.lower().replace('-', '_')} $lllmsd_affinity_key" in text
    assert nginx_setting("hash") == "$lllmsd_affinity_key consistent"
    assert nginx_setting("proxy_buffering") == "off"  # streams pass through as they are written
