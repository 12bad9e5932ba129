"""Helm chart (helm/jobqueue-exporter): rendered by the real Helm engine, linted, validated, and run.

Helm here is ``helm-python-sdk`` (PyPI): Helm v4's own Go SDK compiled into a shared library, so the chart is
rendered, schema-checked and linted by exactly the code ``helm install`` runs, without a ``helm`` binary.
Every rendered object is validated against the Kubernetes OpenAPI schemas (``kubernetes-validate``, strict:
unknown fields fail) or, for the ServiceMonitor and PrometheusRule, against the prometheus-operator CRD schemas
in ``tests/crd-schemas/``. The PrometheusRule and the dashboard ConfigMaps are compared with the very files in
``alerts/`` and ``dashboards/``. Finally the exporter is started with exactly the container args, environment
and config file the chart renders, against a real PostgreSQL with Procrastinate's schema, and scraped; secured
(``ci/secured-values.yaml``), it serves the rendered web config with trustme certificates written where the
Secrets would be mounted, and is scraped over HTTPS with a client certificate and basic auth exactly as the
rendered ServiceMonitor tells Prometheus to.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tarfile
from functools import cache
from pathlib import Path
from typing import Any

import aiohttp
import bcrypt
import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import trustme
import yaml
from helpers import parse_metrics, value

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "jobqueue-exporter"
RULES = ROOT / "alerts" / "jobqueue-alerts.yaml"
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
CRD_SCHEMAS = Path(__file__).resolve().parent / "crd-schemas"
SCENARIOS = {
    p.name.removesuffix("-values.yaml"): p for p in sorted((CHART / "ci").glob("*-values.yaml"))
}
RELEASE, NAMESPACE = "jq", "monitoring"
# the oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest kubernetes-validate knows
KUBE_VERSIONS = ["1.25.0", kubernetes_validate.utils.latest_version()]
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
LABEL_NAME = re.compile(
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
)
LABEL_VALUE = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?")
ENV_REF = re.compile(r"\$\{([A-Z][A-Z0-9_]*)\}")

helm.disable_logging()  # lint mode logs each template `fail` to stderr


# --- rendering ------------------------------------------------------------------------------------------


@cache
def chart() -> helm.Chart:
    return helm.Chart.load(CHART)


def scenario(name: str) -> dict[str, Any]:
    """A ci/*-values.yaml file, parsed by Helm's own YAML parser (as `helm install -f` would)."""
    return helm.values_from_yaml(SCENARIOS[name].read_text())


def with_values(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of ``base`` with dotted keys set, e.g. with_values(v, **{"serviceMonitor.enabled": True})."""
    values = copy.deepcopy(base)
    for dotted, new in changes.items():
        node = values
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = new
    return values


def render_templates(values: dict[str, Any], **options: Any) -> dict[str, str]:
    options = {"name": RELEASE, "namespace": NAMESPACE, **options}
    return chart().render(values, **options)


def render(values: dict[str, Any], **options: Any) -> list[dict[str, Any]]:
    """Every object the chart renders for ``values`` (hooks included, NOTES.txt left out)."""
    objects = []
    for template, text in sorted(render_templates(values, **options).items()):
        if template.endswith("NOTES.txt"):
            continue
        objects += [doc for doc in yaml.safe_load_all(text) if doc]
    return objects


def objects_of(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = objects_of(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {[o['metadata']['name'] for o in found]}"
    return found[0]


def deployment_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def config_map(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The exporter's ConfigMap (the one holding config.yaml)."""
    (found,) = [o for o in objects_of(objects, "ConfigMap") if "config.yaml" in o.get("data", {})]
    return found


def rendered_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return yaml.safe_load(config_map(objects)["data"]["config.yaml"])


def container_env(
    objects: list[dict[str, Any]], secret_data: dict[str, str] | None = None
) -> dict[str, str]:
    """The container's environment as the kubelet would set it: literal values, and secretKeyRefs resolved
    from the rendered Secret (or ``secret_data`` standing in for an existingSecret)."""
    container = deployment_container(objects)
    secrets = {
        s["metadata"]["name"]: {
            k: base64.b64decode(v).decode() for k, v in s.get("data", {}).items()
        }
        for s in objects_of(objects, "Secret")
    }
    env = {}
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
            continue
        ref = item["valueFrom"]["secretKeyRef"]
        data = secrets.get(ref["name"], secret_data or {})
        env[item["name"]] = data[ref["key"]]
    return env


def values_file_objects(name: str) -> list[dict[str, Any]]:
    return render(scenario(name))


# --- schema validation ----------------------------------------------------------------------------------


def _closed(schema: Any) -> Any:
    """The CRD schema with unknown fields rejected where it lists properties (kubectl's strict validation;
    the API server would otherwise prune them silently)."""
    if isinstance(schema, dict):
        schema = {k: _closed(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(v) for v in schema]
    return schema


@cache
def crd_validator(kind: str) -> jsonschema.protocols.Validator:
    schema = json.loads((CRD_SCHEMAS / f"{kind.lower()}-monitoring-v1.json").read_text())
    return jsonschema.Draft7Validator(_closed(schema))


def check_metadata(obj: dict[str, Any]) -> list[str]:
    """What the API server checks for every object, CRs included, beyond the OpenAPI schema."""
    problems = []
    meta = obj["metadata"]
    name = meta["name"]
    limit = 63 if obj["kind"] in {"Service", "Pod"} else 253
    if len(name) > limit or not re.fullmatch(r"[a-z0-9]([-a-z0-9.]*[a-z0-9])?", name):
        problems.append(f"name {name!r} is not a valid DNS name (max {limit})")
    if obj["kind"] == "Service" and not DNS_LABEL.fullmatch(name):
        problems.append(f"Service name {name!r} is not a DNS-1035 label")
    for where in ("labels",):
        for key, val in (meta.get(where) or {}).items():
            if not LABEL_NAME.fullmatch(key) or len(key.split("/")[-1]) > 63:
                problems.append(f"{where} key {key!r} is invalid")
            if not isinstance(val, str) or len(val) > 63 or not LABEL_VALUE.fullmatch(val):
                problems.append(f"{where} value {key}={val!r} is invalid")
    return problems


def validate(obj: dict[str, Any]) -> None:
    """Fail with every schema problem of one rendered object."""
    kind = obj["kind"]
    problems = check_metadata(obj)
    if obj["apiVersion"] == "monitoring.coreos.com/v1":
        problems += [
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in crd_validator(kind).iter_errors(obj)
        ]
    else:
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = "/".join(map(str, exc.absolute_path))
                problems.append(f"Kubernetes {version}: {path}: {exc.message}")
    assert not problems, f"{kind} {obj['metadata']['name']}:\n" + "\n".join(problems)


# --- assets: the chart's copies are the sources -------------------------------------------------------


def test_chart_assets_are_byte_identical_copies_of_the_sources() -> None:
    copies = {
        CHART / "files" / "alerts" / RULES.name: RULES,
        **{CHART / "files" / "dashboards" / d.name: d for d in DASHBOARDS},
    }
    assert DASHBOARDS, "no dashboards found"
    for copy_path, source in copies.items():
        assert copy_path.is_file(), (
            f"{copy_path.relative_to(ROOT)} missing: run python helm/sync_assets.py"
        )
        assert copy_path.read_bytes() == source.read_bytes(), (
            f"{copy_path.relative_to(ROOT)} differs from {source.relative_to(ROOT)}: "
            "run python helm/sync_assets.py"
        )
    shipped = {p for p in (CHART / "files").rglob("*") if p.is_file()}
    assert shipped == set(copies), (
        f"files without a source: {sorted(map(str, shipped - set(copies)))}"
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "helm" / "sync_assets.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr


def test_sync_script_detects_and_repairs_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = importlib.util.spec_from_file_location("sync_assets", ROOT / "helm" / "sync_assets.py")
    assert spec and spec.loader
    sync_assets = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sync_assets)
    files = tmp_path / "files"
    shutil.copytree(CHART / "files", files)
    monkeypatch.setattr(sync_assets, "CHART_FILES", files)
    assert sync_assets.differences() == []
    edited = files / "dashboards" / DASHBOARDS[0].name
    edited.write_bytes(edited.read_bytes().replace(b'"title"', b'"Title"', 1))
    (files / "alerts" / "old-name.yaml").write_text("groups: []\n")
    (files / "alerts" / RULES.name).unlink()
    problems = sync_assets.differences()
    assert any("differs from dashboards/" in p for p in problems), problems
    assert any("jobqueue-alerts.yaml is missing" in p for p in problems), problems
    assert any("old-name.yaml has no source" in p for p in problems), problems
    assert sync_assets.main(["--check"]) == 1
    sync_assets.sync()
    assert sync_assets.differences() == []
    assert edited.read_bytes() == DASHBOARDS[0].read_bytes()


def test_packaged_chart_carries_the_sources(tmp_path: Path) -> None:
    """`helm package`: the archive holds the alert rules and dashboards byte for byte, and renders exactly
    as the chart directory does."""
    archive = Path(helm.package(CHART, destination=tmp_path))
    assert archive.name == f"jobqueue-exporter-{chart().metadata['version']}.tgz"
    with tarfile.open(archive) as tar:
        packaged_files = {
            m.name.removeprefix("jobqueue-exporter/"): tar.extractfile(m).read()
            for m in tar.getmembers()
            if m.isfile() and m.name.startswith("jobqueue-exporter/files/")
        }
    assert packaged_files == {
        f"files/alerts/{RULES.name}": RULES.read_bytes(),
        **{f"files/dashboards/{d.name}": d.read_bytes() for d in DASHBOARDS},
    }
    with helm.Chart.load(archive) as packaged:
        values = scenario("monitoring")
        options = {"name": RELEASE, "namespace": NAMESPACE}
        assert packaged.render(values, **options) == render_templates(values)


# --- lint and schema --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chart defaults", *SCENARIOS])
def test_helm_lint_strict(name: str) -> None:
    values = {} if name == "chart defaults" else scenario(name)
    report = helm.lint(CHART, values, strict=True, namespace=NAMESPACE)
    problems = [m for m in report["messages"] if m["severity"] >= 2]
    assert not problems and not report["errors"], json.dumps(report, indent=2)
    assert report["total_charts_linted"] == 1


def test_defaults_alone_fail_with_what_to_set() -> None:
    with pytest.raises(
        helm.HelmRenderError, match=r"config\.targets is empty: add at least one target"
    ):
        render({})


@pytest.mark.parametrize(
    "values,message",
    [
        (
            {"serviceMonitr": {"enabled": True}},
            "at '': additional properties 'serviceMonitr' not allowed",
        ),
        (
            {"serviceMonitor": {"enabled": True, "intervall": "1m"}},
            "at '/serviceMonitor': additional properties 'intervall' not allowed",
        ),
        ({"replicaCount": "two"}, "at '/replicaCount': got string, want integer"),
        ({"containerPort": 70000}, "at '/containerPort': maximum: got 70,000, want 65,535"),
        ({"service": {"port": 0}}, "at '/service/port': minimum: got 0, want 1"),
        ({"image": {"pullPolicy": "Sometimes"}}, "at '/image/pullPolicy': value must be one of"),
        (
            {
                "config": {
                    "targets": [
                        {"name": "app", "preset": "procrastinate", "dsn": "postgresql://db/app"}
                    ]
                }
            },
            "at '/config/targets/0': additional properties 'dsn' not allowed",
        ),
        (
            {"config": {"targets": [{"name": "app", "dsn_file": "/run/secrets/dsn"}]}},
            "at '/config/targets/0': additional properties 'dsn_file' not allowed",
        ),
        (
            {"config": {"targets": [{"name": "app", "recovery": {"dsn": "postgresql://db/app"}}]}},
            "at '/config/targets/0/recovery': additional properties 'dsn' not allowed",
        ),
        (
            {"config": {"listen": "0.0.0.0:9000", "targets": [{"name": "app"}]}},
            "at '/config': additional properties 'listen' not allowed",
        ),
        (
            {"config": {"targets": [{"name": "app", "preset": "procrastinat"}]}},
            "at '/config/targets/0/preset': value must be one of 'asynq', 'bullmq', 'generic', 'procrastinate', 'publaryn'",
        ),
        (
            {"config": {"targets": [{"name": "app", "stale_after": "30 seconds"}]}},
            "at '/config/targets/0/stale_after': '30 seconds' does not match pattern",
        ),
        (
            {"prometheusRule": {"overrides": {"JobQueueBacklog": {"severty": "critical"}}}},
            "at '/prometheusRule/overrides/JobQueueBacklog': additional properties 'severty' not allowed",
        ),
        (
            {"networkPolicy": {"egress": {"databasePorts": [99999]}}},
            "at '/networkPolicy/egress/databasePorts/0'",
        ),
        # securing the endpoint: webConfig, web, serviceMonitor.tlsConfig / basicAuth
        (
            {"webConfig": {"tls": {"enabled": True, "secretname": "jq-tls"}}},
            "at '/webConfig/tls': additional properties 'secretname' not allowed",
        ),
        (
            {"webConfig": {"tls": {"enabled": "yes"}}},
            "at '/webConfig/tls/enabled': got string, want boolean",
        ),
        (
            {"webConfig": {"tls": {"enabled": True, "secretName": "JQ_TLS"}}},
            "at '/webConfig/tls/secretName': 'JQ_TLS' does not match pattern",
        ),
        (
            {"webConfig": {"tls": {"clientAuthType": "NoClientCert"}}},
            "at '/webConfig/tls/clientAuthType': value must be one of 'RequireAndVerifyClientCert', "
            "'VerifyClientCertIfGiven'",
        ),
        (
            {"webConfig": {"config": "basic_auth_users: {}"}},
            "at '/webConfig/config': got string, want object",
        ),
        (
            {"webConfig": {"config": {"tls_sever_config": {"min_version": "TLS13"}}}},
            "at '/webConfig/config': additional properties 'tls_sever_config' not allowed",
        ),
        (
            {"webConfig": {"config": {"tls_server_config": {"certfile": "tls.crt"}}}},
            "at '/webConfig/config/tls_server_config': additional properties 'certfile' not allowed",
        ),
        (
            {
                "webConfig": {
                    "config": {"tls_server_config": {"client_auth_type": "RequireAnyClientCert"}}
                }
            },
            "at '/webConfig/config/tls_server_config/client_auth_type': value must be one of "
            "'NoClientCert', 'VerifyClientCertIfGiven', 'RequireAndVerifyClientCert'",
        ),
        (
            {"webConfig": {"config": {"tls_server_config": {"min_version": "TLS11"}}}},
            "at '/webConfig/config/tls_server_config/min_version': value must be one of 'TLS12', 'TLS13'",
        ),
        (
            {
                "webConfig": {
                    "config": {"tls_server_config": {"curve_preferences": ["X25519", "CurveP256"]}}
                }
            },
            "at '/webConfig/config/tls_server_config/curve_preferences': maxItems: got 2, want 1",
        ),
        (
            {"webConfig": {"config": {"http_server_config": {"http2": True}}}},
            "at '/webConfig/config/http_server_config/http2': value must be false",
        ),
        (
            {
                "webConfig": {
                    "config": {"http_server_config": {"headers": {"X-Frame-Options": "DENY"}}}
                }
            },
            "at '/webConfig/config/http_server_config/headers/X-Frame-Options': value must be one of",
        ),
        (
            {"webConfig": {"config": {"basic_auth_users": ["prometheus"]}}},
            "at '/webConfig/config/basic_auth_users': got array, want object",
        ),
        (
            {"webConfig": {"config": {"basic_auth_users": {"prom:etheus": "$2y$10$x"}}}},
            "at '/webConfig/config/basic_auth_users': additional properties 'prom:etheus' not allowed",
        ),
        (
            {"webConfig": {"config": {"rate_limit": {"interval": "1 second", "burst": 5}}}},
            "at '/webConfig/config/rate_limit/interval': '1 second' does not match pattern",
        ),
        (
            {"webConfig": {"config": {"rate_limit": {"interval": "1s", "burst": 0}}}},
            "at '/webConfig/config/rate_limit/burst': minimum: got 0, want 1",
        ),
        ({"web": {"headerTimeout": "0s"}}, "at '/web/headerTimeout': '0s' does not match pattern"),
        (
            {"web": {"idleTimeout": "2 minutes"}},
            "at '/web/idleTimeout': '2 minutes' does not match",
        ),
        ({"web": {"maxConnections": 0}}, "at '/web/maxConnections': minimum: got 0, want 1"),
        (
            {"web": {"maxConcurrentScrapes": 2.5}},
            "at '/web/maxConcurrentScrapes': got number, want",
        ),
        (
            {"web": {"max_connections": 10}},
            "at '/web': additional properties 'max_connections' not allowed",
        ),
        (
            {"serviceMonitor": {"basicAuth": {"secret": "scrape-auth"}}},
            "at '/serviceMonitor/basicAuth': additional properties 'secret' not allowed",
        ),
        (
            {"serviceMonitor": {"tlsConfig": {"insecureSkipVerify": "false"}}},
            "at '/serviceMonitor/tlsConfig/insecureSkipVerify': got string, want boolean",
        ),
        (
            {"serviceMonitor": {"tlsConfig": {"ca": {"secret": {"name": "ca", "key": "ca.crt"}}}}},
            "at '/serviceMonitor/tlsConfig': additional properties 'ca' not allowed",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) and v.startswith("at") else None,
)
def test_bad_values_are_rejected_by_the_schema(values: dict[str, Any], message: str) -> None:
    base = scenario("minimal")
    merged = {**base, **values}
    with pytest.raises(helm.HelmValuesError) as caught:
        render(merged)
    text = str(caught.value)
    assert message in text, text
    assert "jobqueue-exporter" in text  # names the chart whose schema rejected it
    # `helm install` goes through the same check (here: a client-side dry run, no cluster needed)
    with pytest.raises(helm.HelmReleaseError, match=re.escape(message)):
        install_dry_run(merged)


@pytest.mark.parametrize(
    "values,message",
    [
        ({"dsns": {}}, 'no DSN for target "app": set existingSecret'),
        ({"existingSecret": "mine"}, "set either existingSecret (your own Secret) or dsns"),
        (
            {"dsns": {"app": "postgresql://db/app", "ap": "x"}},
            'dsns.ap: there is no target named "ap"',
        ),
        (
            {"dsns": {}, "existingSecret": "s", "existingSecretKeys": {"billing": "k"}},
            "existingSecretKeys.billing",
        ),
        (
            {"existingSecretKeys": {"app": "k"}},
            "existingSecretKeys / existingSecretRecoveryKeys name keys of existingSecret",
        ),
        (
            {"networkPolicy": {"enabled": True}},
            "set networkPolicy.egress.databaseCIDRs (or databasePeers)",
        ),
        (
            {"prometheusRule": {"enabled": True, "overrides": {"JobQueueBacklg": {"for": "5m"}}}},
            'prometheusRule.overrides.JobQueueBacklg: there is no alert named "JobQueueBacklg"',
        ),
        (
            {
                "prometheusRule": {
                    "enabled": True,
                    "overrides": {
                        "JobQueueBacklog": {"exprReplace": [{"from": "> 42", "to": "> 1"}]}
                    },
                }
            },
            'prometheusRule.overrides.JobQueueBacklog.exprReplace: "> 42" does not occur in the expression',
        ),
        (
            {"webConfig": {"tls": {"enabled": True}}},
            "webConfig.tls.enabled: set webConfig.tls.secretName to a kubernetes.io/tls Secret",
        ),
        (
            {"webConfig": {"existingSecret": "my-web-config", "config": {"basic_auth_users": {}}}},
            "set either webConfig.config (the chart creates the Secret) or webConfig.existingSecret",
        ),
        (
            {"webConfig": {"config": {"tls_server_config": {"min_version": "TLS13"}}}},
            "webConfig.config.tls_server_config: no server certificate: set webConfig.tls.enabled",
        ),
        (
            {
                "webConfig": {"config": {"basic_auth_users": {"prometheus": "$2b$04$" + "a" * 53}}},
                "serviceMonitor": {"enabled": True},
            },
            "webConfig.config.basic_auth_users is set, so Prometheus must log in: set "
            "serviceMonitor.basicAuth.secretName",
        ),
        (
            {
                "webConfig": {
                    "tls": {"enabled": True, "secretName": "jq-tls", "clientCAKey": "ca.crt"}
                },
                "serviceMonitor": {"enabled": True},
            },
            "client certificates are required (RequireAndVerifyClientCert), so Prometheus must present "
            "one: set serviceMonitor.tlsConfig.certSecretName",
        ),
        (
            {
                "webConfig": {
                    "config": {
                        "tls_server_config": {
                            "cert_file": "/certs/tls.crt",
                            "key_file": "/certs/tls.key",
                        }
                    }
                },
                "serviceMonitor": {"enabled": True},
            },
            "webConfig.config.tls_server_config is set, so Prometheus scrapes over HTTPS: set "
            "serviceMonitor.tlsConfig.caSecretName",
        ),
        (
            {
                "webConfig": {"tls": {"enabled": True, "secretName": "jq-tls"}},
                "serviceMonitor": {"enabled": True, "namespace": "prometheus"},
            },
            "serviceMonitor.namespace is prometheus, but prometheus-operator reads the CA Secret from the "
            "ServiceMonitor's namespace",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_readable_message(
    values: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError) as caught:
        render({**scenario("minimal"), **values})
    assert message in str(caught.value)


def test_values_schema_mirrors_the_exporter_config() -> None:
    """The `config` part of values.schema.json has exactly the exporter's keys, minus DSNs and listen."""
    from typing import get_args

    from jobqueue_exporter.config import (
        Config,
        LogFormat,
        LogLevel,
        Recovery,
        StaleRule,
        StateMapping,
        TableMapping,
        Target,
        Timestamps,
        known_presets,
    )

    def keys(model: Any) -> set[str]:
        return {f.alias or n for n, f in model.model_fields.items()}

    schema = chart().schema
    assert schema is not None
    defs = schema["definitions"]
    config = schema["properties"]["config"]
    assert set(config["properties"]) == keys(Config) - {"listen"}
    assert set(defs["target"]["properties"]) == keys(Target) - {"dsn", "dsn_file"}
    assert set(defs["recovery"]["properties"]) == keys(Recovery) - {"dsn"}
    table = defs["table"]["properties"]
    assert set(table) == keys(TableMapping)
    assert set(table["state"]["properties"]) == keys(StateMapping)
    assert set(table["timestamps"]["properties"]) == keys(Timestamps)
    assert set(table["stale"]["properties"]) == keys(StaleRule)
    assert defs["target"]["properties"]["preset"]["enum"] == known_presets()
    assert config["properties"]["log_format"]["enum"] == list(get_args(LogFormat))
    assert config["properties"]["log_level"]["enum"] == list(get_args(LogLevel))

    def closed_objects(node: Any, path: str = "") -> list[str]:
        """Objects with named properties that still accept unknown keys."""
        found = []
        if isinstance(node, dict):
            if "properties" in node and node.get("additionalProperties") is not False:
                found.append(path or "(top level)")
            for k, v in node.items():
                found += closed_objects(v, f"{path}/{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                found += closed_objects(v, f"{path}/{i}")
        return found

    assert closed_objects(schema) == [], "every object with named keys must reject unknown ones"
    # every default in values.yaml is described by the schema (a key missing there would fail installs)
    chart().validate_schema({})


# --- rendered objects --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_rendered_object_is_valid(name: str) -> None:
    objects = values_file_objects(name)
    assert objects
    for obj in objects:
        validate(obj)
        assert obj["metadata"]["namespace"] == NAMESPACE


def test_every_feature_flag_is_covered_by_a_scenario() -> None:
    kinds = {name: {o["kind"] for o in values_file_objects(name)} for name in SCENARIOS}
    base = {"ServiceAccount", "ConfigMap", "Service", "Deployment", "Pod"}
    assert kinds["minimal"] == base | {"Secret"}
    assert kinds["existing-secret"] == base
    assert kinds["monitoring"] == base | {"Secret", "ServiceMonitor", "PrometheusRule"}
    assert kinds["hardened"] == base | {"Secret", "PodDisruptionBudget", "NetworkPolicy"}
    assert kinds["generic-table"] == base | {"Secret"}
    assert kinds["secured"] == base | {"Secret", "ServiceMonitor"}  # + the web config Secret
    assert set(kinds) == set(SCENARIOS)
    dashboards = [o for o in values_file_objects("monitoring") if o["kind"] == "ConfigMap"]
    assert len(dashboards) == 1 + len(DASHBOARDS)


def test_install_dry_run_renders_the_same_objects() -> None:
    """`helm install --dry-run=client` (the install action, incl. the kubeVersion check) gives the same
    objects as the render the other tests inspect; hooks (the `helm test` pod) are kept apart."""
    values = scenario("monitoring")
    release = install_dry_run(values)
    installed = [doc for doc in yaml.safe_load_all(release["manifest"]) if doc]
    rendered = [
        o for o in render(values) if "helm.sh/hook" not in o["metadata"].get("annotations", {})
    ]
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(installed, key=key) == sorted(rendered, key=key)
    assert (
        "kube-prometheus-stack" not in release["notes"]
    )  # the release label is set: no hint needed
    notes = render_templates(scenario("minimal"))[f"{CHART.name}/templates/NOTES.txt"]
    assert "job_name: jobqueue-exporter" in notes


def install_dry_run(values: dict[str, Any]) -> dict[str, Any]:
    empty_kubeconfig = "apiVersion: v1\nkind: Config\nclusters: []\ncontexts: []\nusers: []\n"
    with helm.Config(
        kubeconfig_content=empty_kubeconfig, namespace=NAMESPACE, storage_driver="memory"
    ) as config:
        return config.install(chart(), RELEASE, values, dry_run="client", namespace=NAMESPACE)


def test_minimal_install_objects() -> None:
    objects = values_file_objects("minimal")
    fullname = f"{RELEASE}-jobqueue-exporter"
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = deployment_container(objects)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "jobqueue-exporter",
        "app.kubernetes.io/instance": RELEASE,
    }
    assert (
        container["image"]
        == "ghcr.io/jobqueue-exporter/jobqueue-exporter:" + chart().metadata["appVersion"]
    )
    assert "command" not in container, "the image's ENTRYPOINT (the console script) must run"
    assert container["args"] == [
        "run",
        "--config",
        "/etc/jobqueue-exporter/config.yaml",
        "--listen",
        "0.0.0.0:17410",
    ]
    assert container["ports"] == [{"name": "metrics", "containerPort": 17410, "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert "resources" not in container

    # restricted Pod Security Standard
    assert pod["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "fsGroup": 10001,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == 10001
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["tmp"]["mountPath"] == "/tmp" and "emptyDir" in volumes["tmp"]
    assert mounts["config"] == {
        "name": "config",
        "mountPath": "/etc/jobqueue-exporter",
        "readOnly": True,
    }
    assert (
        volumes["config"]["configMap"]["name"]
        == config_map(objects)["metadata"]["name"]
        == fullname
    )

    account = one(objects, "ServiceAccount")
    assert account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == account["metadata"]["name"] == fullname

    service = one(objects, "Service")
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 17410, "targetPort": "metrics", "protocol": "TCP"}
    ]
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]
    assert service["spec"]["publishNotReadyAddresses"] is True

    test_pod = one(objects, "Pod")
    assert test_pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    assert test_pod["spec"]["containers"][0]["command"][-1] == (
        f"http://{fullname}.{NAMESPACE}.svc:17410/readyz"
    )


def test_dsns_come_only_from_the_secret() -> None:
    for name in SCENARIOS:
        values = scenario(name)
        objects = render(values)
        config = rendered_config(objects)
        env = {e["name"]: e for e in deployment_container(objects)["env"]}
        secret_name = values.get("existingSecret") or f"{RELEASE}-jobqueue-exporter"
        for target in config["targets"]:
            refs = [target["dsn"]] + (
                [target["recovery"]["dsn"]] if "dsn" in target.get("recovery", {}) else []
            )
            for ref in refs:
                match = ENV_REF.fullmatch(ref)
                assert match, (
                    f"{name}: target {target['name']}: dsn {ref!r} is not an ${{ENV}} reference"
                )
                assert env[match.group(1)]["valueFrom"]["secretKeyRef"]["name"] == secret_name
        # no DSN in any ConfigMap, nor anything that looks like one
        dsns = [*values.get("dsns", {}).values(), *values.get("recoveryDsns", {}).values()]
        for cm in objects_of(objects, "ConfigMap"):
            text = json.dumps(cm)
            assert "postgresql://" not in text and "postgres://" not in text, (
                name,
                cm["metadata"]["name"],
            )
            for dsn in dsns:
                assert dsn not in text
        # ... and the config file is the `config` values, plus the references
        expected = chart().merge_values(values)["config"]
        stripped = copy.deepcopy(config)
        for target in stripped["targets"]:
            del target["dsn"]
            if "dsn" in target.get("recovery", {}):
                del target["recovery"]["dsn"]
        assert stripped == expected, name


def test_created_secret_holds_the_dsns() -> None:
    values = scenario("generic-table")
    objects = render(values)
    secret = one(objects, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {
        "starforge": values["dsns"]["starforge"],
        "starforge.recovery": values["recoveryDsns"]["starforge"],
    }
    env = container_env(objects)
    assert env["JOBQUEUE_TARGET_0_DSN"] == values["dsns"]["starforge"]
    assert env["JOBQUEUE_TARGET_0_RECOVERY_DSN"] == values["recoveryDsns"]["starforge"]


def test_redis_dsns_go_through_the_same_secret() -> None:
    values = scenario("redis")
    objects = render(values)
    secret = one(objects, "Secret")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == values["dsns"]
    assert "redis://" not in json.dumps(config_map(objects)), "no DSN in any ConfigMap"
    env = container_env(objects)
    assert env["JOBQUEUE_TARGET_0_DSN"] == values["dsns"]["tasks"]
    assert env["JOBQUEUE_TARGET_1_DSN"] == values["dsns"]["bull"]


def test_existing_secret_keys() -> None:
    objects = values_file_objects("existing-secret")
    assert objects_of(objects, "Secret") == []
    refs = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in deployment_container(objects)["env"]
        if "valueFrom" in e
    }
    assert refs == {
        "JOBQUEUE_TARGET_0_DSN": {"name": "jobqueue-dsns", "key": "app"},
        "JOBQUEUE_TARGET_0_RECOVERY_DSN": {"name": "jobqueue-dsns", "key": "app-recovery-dsn"},
        "JOBQUEUE_TARGET_1_DSN": {"name": "jobqueue-dsns", "key": "billing-readonly-dsn"},
    }
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/secret" not in annotations  # the chart cannot know the content of your Secret


@pytest.mark.parametrize("name", SCENARIOS)
def test_rendered_config_passes_the_exporters_validation(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from jobqueue_exporter.config import load_config_data

    objects = values_file_objects(name)
    stand_in = {
        k: f"postgresql://stand-in@db/{k}"
        for k in ("app", "app-recovery-dsn", "billing-readonly-dsn")
    }
    for key, val in container_env(objects, secret_data=stand_in).items():
        monkeypatch.setenv(key, val)
    config = load_config_data(rendered_config(objects), "rendered config.yaml")
    assert [t.name for t in config.targets] == [
        t["name"] for t in scenario(name)["config"]["targets"]
    ]
    assert all(t.dsn and t.dsn.startswith(("postgresql://", "redis")) for t in config.targets)


def test_config_checksum_rolls_the_pods_on_config_changes_only() -> None:
    base = scenario("minimal")

    def annotations(values: dict[str, Any]) -> dict[str, str]:
        return one(render(values), "Deployment")["spec"]["template"]["metadata"]["annotations"]

    first = annotations(base)
    assert re.fullmatch(r"[0-9a-f]{64}", first["checksum/config"])
    assert annotations(with_values(base, replicaCount=3)) == first
    changed = annotations(with_values(base, **{"config.poll_interval": "30s"}))
    assert changed["checksum/config"] != first["checksum/config"]
    assert changed["checksum/secret"] == first["checksum/secret"]
    rotated = annotations(with_values(base, dsns={"app": "postgresql://other@db/app"}))
    assert rotated["checksum/secret"] != first["checksum/secret"]
    assert rotated["checksum/config"] == first["checksum/config"]


def test_hardened_scenario() -> None:
    values = scenario("hardened")
    objects = render(values)
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 2
    assert deployment_container(objects)["resources"] == values["resources"]
    assert pod["nodeSelector"] == values["nodeSelector"]
    assert pod["tolerations"] == values["tolerations"]
    assert pod["affinity"] == values["affinity"]
    pod_meta = deployment["spec"]["template"]["metadata"]
    assert pod_meta["labels"]["sidecar.istio.io/inject"] == "false"
    assert pod_meta["annotations"]["example.com/owner"] == "platform"
    for obj in objects:
        assert obj["metadata"]["labels"]["cost-center"] == "platform", obj["kind"]

    pdb = one(objects, "PodDisruptionBudget")
    assert pdb["spec"] == {
        "maxUnavailable": 1,
        "selector": {"matchLabels": deployment["spec"]["selector"]["matchLabels"]},
    }
    min_available = one(
        render(with_values(values, podDisruptionBudget={"enabled": True, "minAvailable": 1})),
        "PodDisruptionBudget",
    )
    assert (
        min_available["spec"]["minAvailable"] == 1 and "maxUnavailable" not in min_available["spec"]
    )

    policy = one(objects, "NetworkPolicy")["spec"]
    assert policy["podSelector"] == {"matchLabels": deployment["spec"]["selector"]["matchLabels"]}
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    assert policy["ingress"] == [
        {
            "ports": [{"port": "metrics", "protocol": "TCP"}],
            "from": values["networkPolicy"]["ingress"]["from"],
        }
    ]
    database, dns = policy["egress"]
    assert database == {
        "to": [{"ipBlock": {"cidr": "10.20.0.0/16"}}],
        "ports": [{"port": 5432, "protocol": "TCP"}, {"port": 6432, "protocol": "TCP"}],
    }
    assert {p["port"] for p in dns["ports"]} == {53} and {p["protocol"] for p in dns["ports"]} == {
        "UDP",
        "TCP",
    }
    # the metrics port the policy names is the container's
    assert deployment_container(objects)["ports"][0]["name"] == "metrics"


# --- monitoring: ServiceMonitor, PrometheusRule, dashboards ---------------------------------------------


def source_groups() -> list[dict[str, Any]]:
    return yaml.safe_load(RULES.read_text())["groups"]


def expected_groups(values: dict[str, Any]) -> list[dict[str, Any]]:
    """alerts/jobqueue-alerts.yaml after the documented overrides, computed independently of the chart."""
    merged = chart().merge_values(values)
    settings = merged["prometheusRule"]
    job = merged["scrapeJobName"]
    groups = []
    for group in copy.deepcopy(source_groups()):
        rules = []
        for rule in group["rules"]:
            override = settings["overrides"].get(rule["alert"], {})
            if override.get("disabled"):
                continue
            expr = rule["expr"].replace('job="jobqueue-exporter"', f'job="{job}"')
            for change in override.get("exprReplace", []):
                assert change["from"] in expr
                expr = expr.replace(change["from"], change["to"])
            rule["expr"] = expr
            if "for" in override:
                rule["for"] = override["for"]
            rule["labels"] = {
                **rule.get("labels", {}),
                **settings["ruleLabels"],
                **override.get("labels", {}),
            }
            if "severity" in override:
                rule["labels"]["severity"] = override["severity"]
            rule["annotations"] = {**rule["annotations"], **override.get("annotations", {})}
            rules.append(rule)
        if rules:
            groups.append({**group, "rules": rules})
    return groups


def test_prometheus_rule_is_the_rules_file() -> None:
    values = with_values(scenario("minimal"), **{"prometheusRule.enabled": True})
    rule = one(render(values), "PrometheusRule")
    assert rule["spec"]["groups"] == source_groups()
    assert rule["metadata"]["name"] == f"{RELEASE}-jobqueue-exporter"
    # Prometheus' own templates are not touched by Helm's
    descriptions = [
        r["annotations"]["description"] for g in rule["spec"]["groups"] for r in g["rules"]
    ]
    assert any("{{ $labels.queue }}" in d for d in descriptions)


def test_prometheus_rule_overrides() -> None:
    values = scenario("monitoring")
    objects = render(values)
    rule = one(objects, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    groups = rule["spec"]["groups"]
    assert groups == expected_groups(values)
    alerts = {r["alert"]: r for g in groups for r in g["rules"]}
    source = {r["alert"]: r for g in source_groups() for r in g["rules"]}
    assert set(source) - set(alerts) == {"JobQueueDeadJobsGrowing"}  # disabled
    changed = alerts["JobQueueOldestPendingTooOld"]
    assert changed["for"] == "10m" and changed["labels"]["severity"] == "critical"
    assert "> 1800" in changed["expr"] and "> 900" not in changed["expr"]
    assert (
        changed["annotations"]["summary"] == "Oldest pending job has waited more than 30 minutes."
    )
    assert (
        changed["annotations"]["runbook_url"]
        == source["JobQueueOldestPendingTooOld"]["annotations"]["runbook_url"]
    )
    assert alerts["JobQueueStaleJobs"]["labels"] == {
        "severity": "warning",
        "team": "platform",
        "page": "false",
    }
    assert all(r["labels"]["team"] == "platform" for r in alerts.values())
    untouched = {k: v for k, v in alerts["JobQueueBacklog"].items() if k != "labels"}
    assert untouched == {k: v for k, v in source["JobQueueBacklog"].items() if k != "labels"}


@pytest.mark.parametrize("job", ["jobqueue-exporter", "queue-metrics"])
def test_scraped_job_name_is_the_one_the_rules_select(job: str) -> None:
    """The ServiceMonitor relabels `job` to scrapeJobName (the operator would use the Service's name,
    jq-jobqueue-exporter) and the PrometheusRule selects that same name."""
    values = with_values(scenario("monitoring"), scrapeJobName=job)
    objects = render(values)
    (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    job_relabels = [r for r in endpoint["relabelings"] if r.get("targetLabel") == "job"]
    assert job_relabels == [{"action": "replace", "targetLabel": "job", "replacement": job}]
    assert endpoint["relabelings"][0] == job_relabels[0], (
        "must come first so user relabelings can see it"
    )
    rule = one(objects, "PrometheusRule")
    selected = {
        m
        for g in rule["spec"]["groups"]
        for r in g["rules"]
        for m in re.findall(r'\bjob="([^"]*)"', r["expr"])
    }
    assert selected == {job}
    assert rule["spec"]["groups"] == expected_groups(values)


def test_service_monitor() -> None:
    values = scenario("monitoring")
    objects = render(values)
    monitor = one(objects, "ServiceMonitor")
    service = one(objects, "Service")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"] == "metrics"
    assert endpoint["path"] == "/metrics"
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "5s")
    assert endpoint["metricRelabelings"] == values["serviceMonitor"]["metricRelabelings"]
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_dashboards_are_the_json_files() -> None:
    values = scenario("monitoring")
    configmaps = [
        o
        for o in objects_of(render(values), "ConfigMap")
        if o["metadata"]["labels"].get("grafana_dashboard")
    ]
    assert len(configmaps) == len(DASHBOARDS)
    by_key = {}
    for cm in configmaps:
        assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert cm["metadata"]["annotations"] == {"grafana_folder": "Job queues"}
        (key,) = cm["data"]
        by_key[key] = cm["data"][key]
        assert len(json.dumps(cm).encode()) < 1024 * 1024  # the ConfigMap size limit
    assert by_key == {d.name: d.read_text(encoding="utf-8") for d in DASHBOARDS}
    relabelled = render(
        with_values(
            values,
            dashboards={
                "enabled": True,
                "label": "grafana_dash",
                "labelValue": "yes",
                "namespace": "grafana",
            },
        )
    )
    moved = [
        o for o in objects_of(relabelled, "ConfigMap") if "grafana_dash" in o["metadata"]["labels"]
    ]
    assert {
        (o["metadata"]["namespace"], o["metadata"]["labels"]["grafana_dash"]) for o in moved
    } == {("grafana", "yes")}


# --- securing the endpoint: web config (TLS, client certificates, basic auth), probes, ServiceMonitor -------

# ci/secured-values.yaml: basic_auth_users.prometheus is the bcrypt hash of this password
SECURED_USER, SECURED_PASSWORD = "prometheus", "ci-password"
WEB_DIR = "/etc/jobqueue-exporter-web"
BCRYPT_HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")


def bcrypt_hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def rendered_secrets(objects: list[dict[str, Any]]) -> dict[str, dict[str, bytes]]:
    """The Secrets the chart renders, decoded: name -> key -> content."""
    return {
        s["metadata"]["name"]: {k: base64.b64decode(v) for k, v in s.get("data", {}).items()}
        for s in objects_of(objects, "Secret")
    }


def web_config_secret(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (found,) = [s for s in objects_of(objects, "Secret") if "web-config.yml" in s.get("data", {})]
    return found


def rendered_web_config(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The web config file (web-config.yml) of the Secret the chart creates."""
    return yaml.safe_load(base64.b64decode(web_config_secret(objects)["data"]["web-config.yml"]))


def pod_volume(objects: list[dict[str, Any]], name: str) -> dict[str, Any]:
    volumes = one(objects, "Deployment")["spec"]["template"]["spec"]["volumes"]
    (found,) = [v for v in volumes if v["name"] == name]
    return found


def projected_files(
    objects: list[dict[str, Any]], cluster_secrets: dict[str, dict[str, bytes]]
) -> dict[str, bytes]:
    """What the kubelet writes into the web-config volume: path -> content, from the Secrets the chart renders
    and ``cluster_secrets`` (the ones it only names, e.g. cert-manager's); a missing Secret or key fails, as
    it would keep the pod from starting."""
    secrets = {**cluster_secrets, **rendered_secrets(objects)}
    files = {}
    for source in pod_volume(objects, "web-config")["projected"]["sources"]:
        secret = source["secret"]
        for item in secret["items"]:
            assert item["path"] not in files, f"two sources project {item['path']}"
            files[item["path"]] = secrets[secret["name"]][item["key"]]
    return files


class Pki:
    """What cert-manager and the monitoring team would provide, made with trustme: a CA issuing the
    exporter's certificate (for the Service's DNS name) and Prometheus' client certificate."""

    def __init__(self, server_name: str = f"{RELEASE}-jobqueue-exporter.{NAMESPACE}.svc"):
        self.ca = trustme.CA()
        self.server = self.ca.issue_cert(server_name)
        self.prometheus = self.ca.issue_cert("prometheus.monitoring.svc")

    def secrets(self) -> dict[str, dict[str, bytes]]:
        """The Secrets ci/secured-values.yaml names, as the cluster would hold them."""

        def tls(leaf: trustme.LeafCert) -> dict[str, bytes]:
            return {
                "tls.crt": b"".join(p.bytes() for p in leaf.cert_chain_pems),
                "tls.key": leaf.private_key_pem.bytes(),
                "ca.crt": self.ca.cert_pem.bytes(),
            }

        return {
            "jobqueue-exporter-tls": tls(self.server),
            "prometheus-client-tls": tls(self.prometheus),
            "jobqueue-exporter-scrape-auth": {
                "username": SECURED_USER.encode(),
                "password": SECURED_PASSWORD.encode(),
            },
        }


def secured_values(**changes: Any) -> dict[str, Any]:
    return with_values(scenario("secured"), **changes)


def test_secured_install_objects() -> None:
    """ci/secured-values.yaml: HTTPS with a cert-manager Secret, client certificates (RequireAndVerifyClientCert)
    from the same CA, basic auth, headers and HTTP limits, and a ServiceMonitor presenting all of it."""
    values = scenario("secured")
    objects = render(values)
    for obj in objects:
        validate(obj)
    fullname = f"{RELEASE}-jobqueue-exporter"

    # the web config Secret: the values' file plus the paths of the projected TLS files
    secret = web_config_secret(objects)
    assert secret["metadata"]["name"] == f"{fullname}-web-config"
    assert secret["type"] == "Opaque"
    assert rendered_web_config(objects) == {
        **values["webConfig"]["config"],
        "tls_server_config": {
            "min_version": "TLS12",
            "cert_file": "tls/tls.crt",
            "key_file": "tls/tls.key",
            "client_ca_file": "tls/client-ca.crt",
            "client_auth_type": "RequireAndVerifyClientCert",
        },
    }

    # one read-only volume: the file and the TLS Secret's keys, side by side (relative paths above)
    container = deployment_container(objects)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    assert mounts["web-config"] == {"name": "web-config", "mountPath": WEB_DIR, "readOnly": True}
    volume = pod_volume(objects, "web-config")["projected"]
    assert volume["defaultMode"] == 0o440  # the pod's fsGroup may read, nobody may write
    assert volume["sources"] == [
        {
            "secret": {
                "name": f"{fullname}-web-config",
                "items": [{"key": "web-config.yml", "path": "web-config.yml"}],
            }
        },
        {
            "secret": {
                "name": "jobqueue-exporter-tls",
                "items": [
                    {"key": "tls.crt", "path": "tls/tls.crt"},
                    {"key": "tls.key", "path": "tls/tls.key"},
                    {"key": "ca.crt", "path": "tls/client-ca.crt"},
                ],
            }
        },
    ]
    assert container["args"][5:] == [
        f"--web.config.file={WEB_DIR}/web-config.yml",
        "--web.header-timeout=5s",
        "--web.idle-timeout=60s",
        "--web.max-connections=32",
        "--web.max-concurrent-scrapes=4",
    ]
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert re.fullmatch(r"[0-9a-f]{64}", annotations["checksum/web-config"])

    # every connection needs a client certificate, which the kubelet cannot present: TCP probes
    for probe in ("livenessProbe", "readinessProbe"):
        assert "httpGet" not in container[probe]
        assert container[probe]["tcpSocket"] == {"port": "metrics"}
        assert container[probe]["periodSeconds"] == chart().values[probe]["periodSeconds"]
    command = one(objects, "Pod")["spec"]["containers"][0]["command"]
    assert command[-2:] == [f"{fullname}.{NAMESPACE}.svc", "17410"]
    assert "create_connection" in command[2]

    (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {
        "ca": {"secret": {"name": "jobqueue-exporter-tls", "key": "ca.crt"}},
        "serverName": f"{fullname}.{NAMESPACE}.svc",
        "insecureSkipVerify": False,
        "cert": {"secret": {"name": "prometheus-client-tls", "key": "tls.crt"}},
        "keySecret": {"name": "prometheus-client-tls", "key": "tls.key"},
    }
    assert endpoint["basicAuth"] == {
        "username": {"name": "jobqueue-exporter-scrape-auth", "key": "username"},
        "password": {"name": "jobqueue-exporter-scrape-auth", "key": "password"},
    }
    notes = render_templates(values)[f"{CHART.name}/templates/NOTES.txt"]
    assert f"https://{fullname}.{NAMESPACE}.svc:17410/metrics" in notes
    assert "Client certificates are required" in notes and "WARNING" not in notes


def test_tls_with_basic_auth_keeps_http_probes_over_https() -> None:
    """Without required client certificates the probes stay httpGet, over HTTPS: /healthz and /readyz need no
    password (and the kubelet does not verify the certificate)."""
    values = secured_values(**{"webConfig.tls.clientAuthType": "VerifyClientCertIfGiven"})
    del values["serviceMonitor"]["tlsConfig"]["certSecretName"]
    objects = render(values)
    for obj in objects:
        validate(obj)
    container = deployment_container(objects)
    assert container["livenessProbe"]["httpGet"] == {
        "path": "/healthz",
        "port": "metrics",
        "scheme": "HTTPS",
    }
    assert container["readinessProbe"]["httpGet"] == {
        "path": "/readyz",
        "port": "metrics",
        "scheme": "HTTPS",
    }
    assert "tcpSocket" not in container["livenessProbe"]
    assert rendered_web_config(objects)["tls_server_config"]["client_auth_type"] == (
        "VerifyClientCertIfGiven"
    )
    test_pod = one(objects, "Pod")["spec"]["containers"][0]["command"]
    assert test_pod[-1] == f"https://{RELEASE}-jobqueue-exporter.{NAMESPACE}.svc:17410/readyz"
    (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert "cert" not in endpoint["tlsConfig"] and "keySecret" not in endpoint["tlsConfig"]


def test_tls_only_and_serving_names() -> None:
    """TLS without client certificates or basic auth; the ServiceMonitor's CA, serverName and
    insecureSkipVerify from values."""
    values = with_values(
        scenario("monitoring"),
        webConfig={"tls": {"enabled": True, "secretName": "jq-tls"}},
        **{
            "serviceMonitor.tlsConfig": {
                "caSecretName": "cluster-ca",
                "caKey": "root.pem",
                "serverName": "metrics.example.com",
            }
        },
    )
    objects = render(values)
    for obj in objects:
        validate(obj)
    assert rendered_web_config(objects) == {
        "tls_server_config": {"cert_file": "tls/tls.crt", "key_file": "tls/tls.key"}
    }
    (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert endpoint["scheme"] == "https"
    assert endpoint["tlsConfig"] == {
        "ca": {"secret": {"name": "cluster-ca", "key": "root.pem"}},
        "serverName": "metrics.example.com",
        "insecureSkipVerify": False,
    }
    assert "basicAuth" not in endpoint
    container = deployment_container(objects)
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    skip = with_values(values, **{"serviceMonitor.tlsConfig": {"insecureSkipVerify": True}})
    (endpoint,) = one(render(skip), "ServiceMonitor")["spec"]["endpoints"]
    validate(one(render(skip), "ServiceMonitor"))
    assert endpoint["tlsConfig"] == {"insecureSkipVerify": True}


def test_basic_auth_without_tls() -> None:
    """Basic auth alone: plain HTTP probes (no credentials needed), a ServiceMonitor with basicAuth but no
    scheme or tlsConfig, and a warning that the password travels in clear text."""
    values = with_values(
        scenario("monitoring"),
        webConfig={"config": {"basic_auth_users": {"prometheus": bcrypt_hash("pw")}}},
        **{
            "serviceMonitor.basicAuth": {
                "secretName": "scrape-auth",
                "usernameKey": "user",
                "passwordKey": "pass",
            }
        },
    )
    objects = render(values)
    for obj in objects:
        validate(obj)
    container = deployment_container(objects)
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert f"--web.config.file={WEB_DIR}/web-config.yml" in container["args"]
    assert [
        s["secret"]["name"] for s in pod_volume(objects, "web-config")["projected"]["sources"]
    ] == [f"{RELEASE}-jobqueue-exporter-web-config"]
    (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
    assert "scheme" not in endpoint and "tlsConfig" not in endpoint
    assert endpoint["basicAuth"] == {
        "username": {"name": "scrape-auth", "key": "user"},
        "password": {"name": "scrape-auth", "key": "pass"},
    }
    notes = render_templates(values)[f"{CHART.name}/templates/NOTES.txt"]
    assert "WARNING: basic auth without TLS sends the password in clear text" in notes


def test_web_config_from_an_existing_secret_and_a_separate_client_ca() -> None:
    values = with_values(
        scenario("minimal"),
        webConfig={
            "existingSecret": "my-web-config",
            "existingSecretKey": "web.yml",
            "tls": {
                "enabled": True,
                "secretName": "jq-tls",
                "clientCASecret": "clients-ca",
                "clientAuthType": "VerifyClientCertIfGiven",
            },
        },
    )
    objects = render(values)
    for obj in objects:
        validate(obj)
    assert [s["metadata"]["name"] for s in objects_of(objects, "Secret")] == [
        f"{RELEASE}-jobqueue-exporter"  # the DSNs only: the web config is yours
    ]
    assert pod_volume(objects, "web-config")["projected"]["sources"] == [
        {
            "secret": {
                "name": "my-web-config",
                "items": [{"key": "web.yml", "path": "web-config.yml"}],
            }
        },
        {
            "secret": {
                "name": "jq-tls",
                "items": [
                    {"key": "tls.crt", "path": "tls/tls.crt"},
                    {"key": "tls.key", "path": "tls/tls.key"},
                ],
            }
        },
        {
            "secret": {
                "name": "clients-ca",
                "items": [{"key": "ca.crt", "path": "tls/client-ca.crt"}],
            }
        },
    ]
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert "checksum/web-config" not in annotations  # the chart cannot know your Secret's content
    container = deployment_container(objects)
    assert f"--web.config.file={WEB_DIR}/web-config.yml" in container["args"]
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"


def test_users_tls_settings_win_over_the_charts() -> None:
    """cert/key (inline PEM, kept in the Secret) or cert_file set by the user are not overwritten."""
    pki = Pki()
    own = {
        "cert": pki.server.cert_chain_pems[0].bytes().decode(),
        "key": pki.server.private_key_pem.bytes().decode(),
        "client_ca_file": "/etc/other-ca/ca.crt",
        "client_auth_type": "VerifyClientCertIfGiven",
    }
    values = with_values(
        scenario("minimal"),
        webConfig={
            "config": {"tls_server_config": own},
            "tls": {"enabled": True, "secretName": "jq-tls", "clientCAKey": "ca.crt"},
        },
    )
    objects = render(values)
    assert rendered_web_config(objects)["tls_server_config"] == own
    for cm in objects_of(objects, "ConfigMap"):
        assert "PRIVATE KEY" not in json.dumps(cm)


def test_secrets_stay_out_of_config_maps() -> None:
    """Hashes, keys and the web config are in Secrets only: no ConfigMap holds any of them."""
    pki = Pki()
    inline_key = pki.server.private_key_pem.bytes().decode()
    variants = {
        "secured": scenario("secured"),
        "inline key": with_values(
            scenario("monitoring"),
            webConfig={
                "config": {
                    "basic_auth_users": {"alice": bcrypt_hash("a"), "bob": bcrypt_hash("b")},
                    "tls_server_config": {
                        "cert": pki.server.cert_chain_pems[0].bytes().decode(),
                        "key": inline_key,
                    },
                }
            },
            **{
                "serviceMonitor.basicAuth.secretName": "scrape-auth",
                "serviceMonitor.tlsConfig.caSecretName": "ca",
            },
        ),
    }
    for name, values in variants.items():
        objects = render(values)
        hashes = list(values["webConfig"]["config"]["basic_auth_users"].values())
        assert hashes
        web = base64.b64decode(web_config_secret(objects)["data"]["web-config.yml"]).decode()
        assert all(h in web for h in hashes), name
        for cm in objects_of(objects, "ConfigMap"):
            text = json.dumps(cm)
            assert not BCRYPT_HASH.search(text), (name, cm["metadata"]["name"])
            for marker in ("basic_auth_users", "tls_server_config", "PRIVATE KEY", inline_key):
                assert marker not in text, (name, cm["metadata"]["name"], marker)
        for obj in objects:
            if obj["kind"] != "Secret":
                text = json.dumps(obj)
                assert not BCRYPT_HASH.search(text) and "PRIVATE KEY" not in text, (
                    name,
                    obj["kind"],
                )


def test_a_password_in_place_of_a_hash_is_refused_without_echoing_it(tmp_path: Path) -> None:
    from jobqueue_exporter.config import ConfigError
    from jobqueue_exporter.webconfig import load_web_config

    password = "correct-horse-battery-staple"
    values = with_values(
        scenario("minimal"), webConfig={"config": {"basic_auth_users": {"prometheus": password}}}
    )
    with pytest.raises(helm.HelmRenderError) as caught:
        render(values)
    text = str(caught.value)
    assert "webConfig.config.basic_auth_users.prometheus: not a bcrypt hash" in text
    assert "never the password" in text and "bcrypt.hashpw" in text
    assert password not in text
    # the exporter would refuse the same file at startup, in the same words
    web_file = tmp_path / "web-config.yml"
    web_file.write_text(yaml.safe_dump(values["webConfig"]["config"]))
    with pytest.raises(ConfigError) as refused:
        load_web_config(web_file)
    assert "basic_auth_users.prometheus: not a bcrypt hash" in str(refused.value)
    assert password not in str(refused.value)
    values["webConfig"]["config"]["basic_auth_users"]["prometheus"] = bcrypt_hash(password)
    assert rendered_web_config(render(values))["basic_auth_users"]["prometheus"].startswith(
        "$2b$04$"
    )


def test_web_limits_are_args_only_when_set() -> None:
    from jobqueue_exporter.cli import parser

    plain = deployment_container(render(scenario("minimal")))["args"]
    assert not [a for a in plain if a.startswith("--web.")]
    objects = render(
        with_values(scenario("minimal"), web={"headerTimeout": "2s", "maxConcurrentScrapes": 2})
    )
    args = deployment_container(objects)["args"]
    assert args[5:] == ["--web.header-timeout=2s", "--web.max-concurrent-scrapes=2"]
    # the exporter's own command line accepts exactly these
    parsed = parser().parse_args(args)
    assert (parsed.web_header_timeout, parsed.web_max_concurrent_scrapes) == (2.0, 2)
    assert (parsed.web_idle_timeout, parsed.web_max_connections) == (120.0, 64)  # defaults
    assert parsed.web_config_file is None
    numbers = render(
        with_values(scenario("minimal"), web={"idleTimeout": 90, "maxConnections": 1000000})
    )
    assert deployment_container(numbers)["args"][5:] == [
        "--web.idle-timeout=90",
        "--web.max-connections=1000000",
    ]
    secured = parser().parse_args(deployment_container(render(scenario("secured")))["args"])
    assert secured.web_config_file == f"{WEB_DIR}/web-config.yml"
    assert (secured.web_header_timeout, secured.web_idle_timeout) == (5.0, 60.0)
    assert (secured.web_max_connections, secured.web_max_concurrent_scrapes) == (32, 4)


def test_values_schema_mirrors_the_web_config_loader() -> None:
    """webConfig.config's schema has exactly the keys and choices the exporter's loader supports."""
    from jobqueue_exporter import webconfig

    schema = chart().schema
    assert schema is not None
    file = schema["definitions"]["webConfigFile"]["properties"]
    assert set(file) == set(webconfig._TOP_KEYS)
    tls = file["tls_server_config"]["properties"]
    assert set(tls) == set(webconfig._TLS_KEYS)
    assert tls["client_auth_type"]["enum"] == list(webconfig._CLIENT_AUTH)
    assert tls["min_version"]["enum"] == tls["max_version"]["enum"] == list(webconfig._TLS_VERSIONS)
    assert tls["cipher_suites"]["items"]["enum"] == [
        *webconfig._TLS12_CIPHERS,
        *webconfig._TLS13_CIPHERS,
    ]
    assert tls["curve_preferences"]["items"]["enum"] == list(webconfig._CURVES)
    http = file["http_server_config"]["properties"]
    assert set(http) == set(webconfig._HTTP_KEYS)
    headers = http["headers"]["properties"]
    assert set(headers) == set(webconfig._HEADERS)
    for name, allowed in webconfig._HEADERS.items():
        if allowed is not None:
            assert set(headers[name]["enum"]) == {*allowed, ""}, name  # blank: not set
    assert set(file["rate_limit"]["properties"]) == set(webconfig._RATE_LIMIT_KEYS)
    chart_auth = schema["properties"]["webConfig"]["properties"]["tls"]["properties"]
    assert set(chart_auth["clientAuthType"]["enum"]) == set(webconfig._CLIENT_AUTH) - {
        "NoClientCert"
    }


@pytest.mark.parametrize("auth_type", ["RequireAndVerifyClientCert", "VerifyClientCertIfGiven"])
def test_rendered_web_config_passes_the_exporters_validation(
    auth_type: str, tmp_path: Path
) -> None:
    """The exporter's loader accepts the rendered file with the projected Secrets in place, and ends up with
    what the values asked for."""
    from jobqueue_exporter.webconfig import load_web_config

    objects = render(secured_values(**{"webConfig.tls.clientAuthType": auth_type}))
    for path, data in projected_files(objects, Pki().secrets()).items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_bytes(data)
    config = load_web_config(tmp_path / "web-config.yml")
    context = config.ssl_context()
    assert context is not None and context.minimum_version == ssl.TLSVersion.TLSv1_2
    expected = {
        "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
        "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    }
    assert context.verify_mode == expected[auth_type]
    assert config.auth_required  # basic_auth_users


# --- the chart's Deployment, run for real -------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def console_script(name: str = "jobqueue-exporter") -> str:
    path = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    assert path, f"{name} is not installed next to {sys.executable}"
    return path


def materialise(
    objects: list[dict[str, Any]],
    root: Path,
    cluster_secrets: dict[str, dict[str, bytes]] | None = None,
) -> list[str]:
    """Write the ConfigMap, and the web-config volume (the chart's Secret plus ``cluster_secrets``, the ones it
    only names), where the Deployment mounts them (under ``root``) and return the container's args with those
    mount paths rewritten to the local directories; everything else stays as rendered."""
    container = deployment_container(objects)
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    mount = mounts["config"]
    local = root / mount["mountPath"].lstrip("/")
    local.mkdir(parents=True)
    for key, text in config_map(objects)["data"].items():
        (local / key).write_text(text)
    args = list(container["args"])
    config_arg = args[args.index("--config") + 1]
    assert config_arg.startswith(mount["mountPath"] + "/")
    args[args.index("--config") + 1] = str(
        local / config_arg.removeprefix(mount["mountPath"] + "/")
    )
    if "web-config" in mounts:
        web_mount = mounts["web-config"]["mountPath"]
        web_local = root / web_mount.lstrip("/")
        mode = pod_volume(objects, "web-config")["projected"]["defaultMode"]
        for path, data in projected_files(objects, cluster_secrets or {}).items():
            (web_local / path).parent.mkdir(parents=True, exist_ok=True)
            (web_local / path).write_bytes(data)
            (web_local / path).chmod(mode)
        flag = "--web.config.file="
        (i,) = [i for i, arg in enumerate(args) if arg.startswith(flag)]
        web_arg = args[i].removeprefix(flag)
        assert web_arg.startswith(web_mount + "/")
        args[i] = flag + str(web_local / web_arg.removeprefix(web_mount + "/"))
    return args


def prometheus_scrape(
    endpoint: dict[str, Any], secrets: dict[str, dict[str, bytes]], directory: Path
) -> dict[str, Any]:
    """aiohttp request options doing what Prometheus does with a ServiceMonitor endpoint: its tlsConfig (CA,
    serverName, client certificate) and basicAuth, each resolved from the Secret it selects."""
    options: dict[str, Any] = {}
    tls = endpoint.get("tlsConfig")
    if tls is not None:
        assert endpoint["scheme"] == "https"
        assert not tls.get("insecureSkipVerify")
        ca = tls["ca"]["secret"]
        context = ssl.create_default_context(cadata=secrets[ca["name"]][ca["key"]].decode())
        if "cert" in tls:
            directory.mkdir(parents=True, exist_ok=True)
            cert, key = tls["cert"]["secret"], tls["keySecret"]
            (directory / "client.crt").write_bytes(secrets[cert["name"]][cert["key"]])
            (directory / "client.key").write_bytes(secrets[key["name"]][key["key"]])
            context.load_cert_chain(directory / "client.crt", directory / "client.key")
        options.update(ssl=context, server_hostname=tls["serverName"])
    if "basicAuth" in endpoint:
        user, password = endpoint["basicAuth"]["username"], endpoint["basicAuth"]["password"]
        options["headers"] = basic_auth(
            secrets[user["name"]][user["key"]].decode(),
            secrets[password["name"]][password["key"]].decode(),
        )
    return options


def basic_auth(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


async def wait_http(
    session: aiohttp.ClientSession,
    url: str,
    status: int = 200,
    timeout: float = 30.0,
    **options: Any,
) -> str:
    deadline = asyncio.get_running_loop().time() + timeout
    last = "no answer"
    while asyncio.get_running_loop().time() < deadline:
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url, **options) as response:
                body = await response.text()
                if response.status == status:
                    return body
                last = f"{response.status}: {body}"
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url} did not answer {status} within {timeout}s (last: {last})")


async def kubelet_probe(
    session: aiohttp.ClientSession, probe: dict[str, Any], port: int, timeout: float = 30.0
) -> str | None:
    """Run a probe as the kubelet would, until it succeeds: an httpGet (over HTTPS without verifying the
    certificate, and without credentials) returns the body; a tcpSocket probe only connects."""
    if "tcpSocket" in probe:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise
                await asyncio.sleep(0.2)
                continue
            writer.close()
            return None
    get = probe["httpGet"]
    scheme = get.get("scheme", "HTTP").lower()
    return await wait_http(
        session, f"{scheme}://127.0.0.1:{port}{get['path']}", timeout=timeout, ssl=False
    )


# plain: ci/minimal-values.yaml; mtls: ci/secured-values.yaml (client certificates required: TCP probes);
# tls-basic-auth: the same with client certificates optional (HTTPS httpGet probes, without the password)
RUN_SETUPS = {
    "plain": ("minimal", {}),
    "mtls": ("secured", {}),
    "tls-basic-auth": ("secured", {"webConfig.tls.clientAuthType": "VerifyClientCertIfGiven"}),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("setup", RUN_SETUPS)
async def test_exporter_runs_as_the_chart_deploys_it(dsn: str, tmp_path: Path, setup: str) -> None:
    """The exporter started with the rendered args, env and files. Secured: the web config Secret and trustme
    certificates (standing in for cert-manager's and Prometheus' Secrets) are written where the pod mounts
    them; the probes run as the kubelet would, and /metrics is scraped over HTTPS with the CA, serverName,
    client certificate and password the ServiceMonitor names. The `helm test` pod's command runs too."""
    from procrastinate_app import apply_schema

    app = await apply_schema(dsn)
    async with app.open_async():
        await app.tasks["ok"].defer_async(n=1)

    port = free_port()
    scenario_name, changes = RUN_SETUPS[setup]
    values = with_values(
        scenario(scenario_name),
        containerPort=port,
        dsns={"app": dsn, "app2": dsn},
        **{"config.poll_interval": "1s"},
        **changes,
    )
    values["config"]["targets"].append(
        {"name": "app2", "preset": "procrastinate", "queues": ["default"]}
    )
    objects = render(values)
    for obj in objects:
        validate(obj)
    assert dsn not in json.dumps(objects_of(objects, "ConfigMap"))
    container = deployment_container(objects)
    secured = setup != "plain"
    cluster_secrets: dict[str, dict[str, bytes]] = {}
    scrape: dict[str, Any] = {}
    scheme = "http"
    if secured:
        (endpoint,) = one(objects, "ServiceMonitor")["spec"]["endpoints"]
        pki = Pki(server_name=endpoint["tlsConfig"]["serverName"])
        cluster_secrets = pki.secrets()
        scrape = prometheus_scrape(endpoint, cluster_secrets, tmp_path / "prometheus")
        scheme = endpoint["scheme"]
        assert set(scrape) == {"ssl", "server_hostname", "headers"}
    args = materialise(objects, tmp_path, cluster_secrets)
    assert args[3:5] == ["--listen", f"0.0.0.0:{port}"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBQUEUE_")}
    env.update(container_env(objects))
    log = tmp_path / "exporter.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            console_script(), *args, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path
        )
    try:
        base = f"{scheme}://127.0.0.1:{port}"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            assert await kubelet_probe(session, container["livenessProbe"], port) in ("ok\n", None)
            ready = await kubelet_probe(session, container["readinessProbe"], port)
            if secured:
                if ready is not None:
                    assert ready == "ready\n"  # the kubelet has no password: the status, no details
                await check_secured_endpoint(session, base, scrape, pki, setup == "mtls")
                ready = await wait_http(session, base + "/readyz", **scrape)
            assert ready is not None
            assert ready.startswith("ready\n") and "app (procrastinate): up, polled" in ready
            async with session.get(base + "/metrics", **scrape) as response:
                assert response.status == 200
                samples = parse_metrics(await response.text())
                if secured:
                    headers = values["webConfig"]["config"]["http_server_config"]["headers"]
                    assert {k: response.headers.get(k) for k in headers} == headers
        assert value(samples, "jobqueue_up", target="app") == 1
        assert value(samples, "jobqueue_up", target="app2") == 1
        assert (
            value(
                samples, "jobqueue_jobs", target="app", queue="default", kind="ok", state="pending"
            )
            == 1
        )
        assert (
            value(
                samples, "jobqueue_jobs", target="app2", queue="default", kind="ok", state="pending"
            )
            == 1
        )
        # `helm test`: the test pod's command, with the Service's address pointing here
        service = f"{RELEASE}-jobqueue-exporter.{NAMESPACE}.svc"
        service_port = str(chart().merge_values(values)["service"]["port"])
        command = [
            sys.executable
            if part == "python"
            else "127.0.0.1"
            if part == service
            else str(port)
            if part == service_port
            else part.replace(f"{service}:{service_port}", f"127.0.0.1:{port}")
            for part in one(objects, "Pod")["spec"]["containers"][0]["command"]
        ]
        helm_test = await asyncio.create_subprocess_exec(
            *command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        helm_test_output = (await asyncio.wait_for(helm_test.communicate(), 30))[0].decode()
        assert helm_test.returncode == 0, helm_test_output
        expected = "accepts connections" if setup == "mtls" else "/readyz 200 ready"
        assert expected in helm_test_output, helm_test_output
        # Kubernetes stops a pod with SIGTERM: a clean, prompt exit
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), timeout=10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        output = log.read_text(errors="replace")
    assert dsn not in output, "the DSN must not be logged"
    assert SECURED_PASSWORD not in output.replace(dsn, ""), "the password must not be logged"
    # log_format: json from the chart's values: one JSON object per line
    entries = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any(e["message"].startswith("listening on") for e in entries), output


async def check_secured_endpoint(
    session: aiohttp.ClientSession,
    base: str,
    scrape: dict[str, Any],
    pki: Pki,
    client_cert_required: bool,
) -> None:
    """What the secured exporter refuses, and what it serves without the password."""
    # Prometheus' client certificate, without the password
    identity = {k: v for k, v in scrape.items() if k != "headers"}
    # /healthz and /readyz need no password; /readyz lists the per-target details only with it
    assert await wait_http(session, base + "/healthz", **identity) == "ok\n"
    assert await wait_http(session, base + "/readyz", **identity) == "ready\n"
    async with session.get(base + "/metrics", **identity) as response:
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == 'Basic realm="jobqueue-exporter"'
    wrong = basic_auth(SECURED_USER, "not-" + SECURED_PASSWORD)
    async with session.get(base + "/metrics", headers=wrong, **identity) as response:
        assert response.status == 401
    no_cert = {
        "ssl": ssl.create_default_context(cadata=pki.ca.cert_pem.bytes().decode()),
        "server_hostname": scrape["server_hostname"],
    }
    if client_cert_required:
        # without a client certificate TLS refuses the connection, even for /healthz, password or not
        with pytest.raises((aiohttp.ClientError, ssl.SSLError, ConnectionError)):
            async with session.get(
                base + "/healthz", headers=scrape["headers"], **no_cert
            ) as response:
                await response.read()
    else:
        # the certificate is optional: the password alone is enough, and needed
        assert await wait_http(session, base + "/healthz", **no_cert) == "ok\n"
        async with session.get(base + "/metrics", **no_cert) as response:
            assert response.status == 401
        async with session.get(base + "/metrics", headers=scrape["headers"], **no_cert) as response:
            assert response.status == 200
    # Prometheus really checks the exporter's certificate: trusting another CA, the scrape fails
    stranger = ssl.create_default_context(cadata=trustme.CA().cert_pem.bytes().decode())
    with pytest.raises(aiohttp.ClientError):
        async with session.get(
            base + "/healthz", ssl=stranger, server_hostname=scrape["server_hostname"]
        ) as response:
            await response.read()
    # every endpoint is HTTPS: plain HTTP gets no answer
    with pytest.raises(aiohttp.ClientError):
        async with session.get(base.replace("https://", "http://", 1) + "/healthz") as response:
            await response.read()


def test_rendering_is_deterministic() -> None:
    """No random names, passwords or timestamps: re-rendering gives the same manifests (empty GitOps diffs)."""
    values = scenario("monitoring")
    assert render_templates(values) == render_templates(values)


# --- the README's Helm section: every example is valid and agrees with the chart --------------------------


def readme_blocks(heading: str) -> list[str]:
    """The ```yaml blocks of one README section (## or ###), up to the next heading of that level or above
    (lines inside code blocks are never headings)."""
    level = len(heading.split(" ")[0])
    blocks: list[str] = []
    inside, fence, block = False, None, []
    for line in (ROOT / "README.md").read_text().splitlines():
        if fence is None and not inside and line == heading:
            inside = True
            continue
        if fence is None and line.startswith("#") and inside:
            hashes = len(line) - len(line.lstrip("#"))
            if line[hashes : hashes + 1] == " " and hashes <= level:
                break
        if line.startswith("```"):
            if fence is None:
                fence, block = line[3:].strip(), []
            else:
                if inside and fence == "yaml":
                    blocks.append("\n".join(block) + "\n")
                fence = None
            continue
        block.append(line)
    return blocks


def test_readme_install_values_render() -> None:
    install = next(b for b in readme_blocks("## Helm") if b.startswith("# jobqueue-values.yaml"))
    objects = render(helm.values_from_yaml(install))
    for obj in objects:
        validate(obj)
    assert objects_of(objects, "Secret") == []
    (stack,) = [b for b in readme_blocks("### kube-prometheus-stack")]
    values = {**scenario("minimal"), **helm.values_from_yaml(stack)}
    objects = render(values)
    for obj in objects:
        validate(obj)
    assert one(objects, "PrometheusRule")["spec"]["groups"] == expected_groups(values)
    (scrape,) = readme_blocks("### Plain Prometheus")
    (job,) = yaml.safe_load(scrape)["scrape_configs"]
    assert job["job_name"] == chart().values["scrapeJobName"]
    assert job["static_configs"][0]["targets"] == [
        f"jobqueue-exporter.monitoring.svc:{chart().values['service']['port']}"
    ]


def test_chart_readme_install_command_renders() -> None:
    text = (CHART / "README.md").read_text()
    sets = re.findall(r"--set '?([^' \n]+)'?", text)
    assert len(sets) == 3, sets
    objects = render(helm.parse_set_string(",".join(sets)))
    for obj in objects:
        validate(obj)
    assert container_env(objects, secret_data={"app": "postgresql://stand-in@db/app"})


def test_readme_sidecar_recipe(monkeypatch: pytest.MonkeyPatch) -> None:
    from jobqueue_exporter.config import load_config_data

    pod_part, configmap, podmonitor = (yaml.safe_load(b) for b in readme_blocks("### Sidecar"))
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "app-worker"}, "spec": pod_part}
    pod["spec"]["containers"].insert(
        0, {"name": "worker", "image": "registry.example.com/app:1.2.3"}
    )
    validate(pod)
    validate(configmap)
    sidecar = pod_part["containers"][1]
    chart_container = deployment_container(render(scenario("minimal")))
    assert sidecar["image"] == chart_container["image"]
    assert sidecar["args"] == chart_container["args"]
    assert sidecar["securityContext"].items() <= {**chart().values["securityContext"]}.items()
    assert "readinessProbe" not in sidecar
    (mount,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == "/etc/jobqueue-exporter"]
    (volume,) = [v for v in pod_part["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    monkeypatch.setenv("APP_DATABASE_URL", "postgresql://stand-in@db/app")
    config = load_config_data(yaml.safe_load(configmap["data"]["config.yaml"]))
    assert config.targets[0].dsn == "postgresql://stand-in@db/app"
    assert {e["name"] for e in sidecar["env"]} == {"APP_DATABASE_URL"}
    assert podmonitor["kind"] == "PodMonitor"
    validate(podmonitor)
    (endpoint,) = podmonitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == sidecar["ports"][0]["name"]
    assert {
        "action": "replace",
        "targetLabel": "job",
        "replacement": "jobqueue-exporter",
    } in endpoint["relabelings"]
