"""charts/moe-watch, rendered by Helm's own template engine (helm-python-sdk binds the Helm v4 Go
SDK: no helm binary), linted, and every object validated offline against the Kubernetes schema
(kubernetes_validate) and the Prometheus Operator CRD schemas (tests/crds/). deploy/base is the
chart's rendering with its defaults (moe_watch/generate/chart.py; tests/test_generated.py fails
when it is stale)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.crd_schema import validate as validate_crd

helm = pytest.importorskip("helm_python", reason="pip install -e '.[test]' (helm-python-sdk)")

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts/moe-watch"
KUBERNETES_VERSION = "1.30"
CRD_KINDS = {"ServiceMonitor", "PrometheusRule"}

from moe_watch.generate import chart as render_chart  # noqa: E402

NON_DEFAULT: dict[str, Any] = {
    "port": 9555,
    "image": {"repository": "123456789012.dkr.ecr.us-west-2.amazonaws.com/moe-watch", "tag": "0.1.0",
              "digest": "sha256:" + "ab" * 32},
    "config": {"interval_seconds": 10, "listen": "0.0.0.0:1", "expert_top_n": 8},
    "plans": {"mixtral.yaml": (ROOT / "deploy/examples/plans/example-mixtral.yaml").read_text()},
    "kubeletPath": "/var/lib/kubelet-custom/",
    "webConfig": {"secretName": "moe-watch-web", "tls": True},
    "priorityClassName": "gpu-node-agents",
    "runtimeClassName": "nvidia",
    "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    "nodeSelector": {"karpenter.sh/nodepool": "gpu"},
    "affinity": None,  # Helm: null drops a default map (an empty one would merge into it)
    "extraEnv": [{"name": "MOE_WATCH_EXPERT_FULL_DETAIL", "value": "true"}],
    "extraArgs": ["--interval", "10"],
    "serviceMonitor": {
        "interval": "30s", "scrapeTimeout": "20s", "honorLabels": True,
        "additionalLabels": {"release": "kps"},
        "relabelings": [{"targetLabel": "cluster", "replacement": "prod-us-west-2"}],
        "metricRelabelings": [{"action": "labeldrop", "regex": "driver_version"}],
        "tlsConfig": {"insecureSkipVerify": True},
        "basicAuth": {"username": {"name": "moe-watch-scrape", "key": "username"},
                      "password": {"name": "moe-watch-scrape", "key": "password"}},
    },
    "prometheusRule": {"additionalLabels": {"release": "kps"}},
    "state": {"hostPath": "/var/lib/moe-watch-state"},
    "dashboards": {"label": "grafana_dashboard_moe", "labelValue": "yes",
                   "annotations": {"grafana_folder": "MoE"}},
}  # fmt: skip


def validate_all(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        if obj["kind"] in CRD_KINDS:
            validate_crd(obj)
        else:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


# -- the engine itself, against a chart whose output is known --------------------------------


def test_the_helm_engine_renders_a_chart_whose_output_is_known() -> None:
    known = ROOT / "tests/fixtures/helm/known"
    with helm.Chart.load(known) as chart:
        out = chart.render({"labels": {"a": "b"}, "x": "y"}, name="rel", namespace="ns")
        assert out["fx/templates/cm.yaml"] == (known / "expected.yaml").read_text()
        with pytest.raises(helm.HelmRenderError, match="x is required"):
            chart.render({}, name="rel", namespace="ns")
    assert helm.lint(known, strict=True)["errors"] == []


# -- the moe-watch chart ----------------------------------------------------------------------


def test_the_chart_lints_clean_with_default_and_non_default_values() -> None:
    for values in (None, NON_DEFAULT):
        report = helm.lint(CHART, values, strict=True, kube_version="v1.30.0", namespace="gpu")
        assert report["errors"] == [], report
        problems = [m for m in report["messages"] if m["severity"] >= 2]
        assert problems == [], problems


def test_default_rendering_passes_every_schema() -> None:
    objects = render_chart.objects(render_chart.render())
    kinds = {o["kind"] for o in objects}
    assert kinds == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap",
                     "Service", "DaemonSet", "ServiceMonitor", "PrometheusRule"}  # fmt: skip
    assert "Namespace" not in kinds  # the namespace is chosen at install time, never owned
    validate_all(objects)
    assert len(by_kind(objects, "ConfigMap")) == 1 + 4  # config + the four dashboards
    (monitor,) = by_kind(objects, "ServiceMonitor")
    (rule,) = by_kind(objects, "PrometheusRule")
    for obj in (monitor, rule):
        assert "release" not in obj["metadata"]["labels"]  # no hard-coded kube-prometheus-stack
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["honorLabels"] is False  # docs/metrics.md: the k8s_* labels stay the agent's


def test_one_port_value_drives_container_service_probes_and_listen() -> None:
    from moe_watch.config import DEFAULT_PORT, Settings

    with helm.Chart.load(CHART) as chart:
        assert chart.values["port"] == DEFAULT_PORT
    for port in (DEFAULT_PORT, 9555):
        objects = render_chart.objects(render_chart.render({"port": port}))
        (ds,) = by_kind(objects, "DaemonSet")
        (container,) = ds["spec"]["template"]["spec"]["containers"]
        assert container["ports"] == [{"name": "metrics", "containerPort": port}]
        assert container["livenessProbe"]["httpGet"]["port"] == "metrics"
        assert container["readinessProbe"]["httpGet"]["port"] == "metrics"
        (service,) = by_kind(objects, "Service")
        assert service["spec"]["ports"][0]["port"] == port
        config = next(c for c in by_kind(objects, "ConfigMap") if "config.yaml" in c["data"])
        settings = Settings(**yaml.safe_load(config["data"]["config.yaml"]))
        assert settings.listen == f"0.0.0.0:{port}"


def test_non_default_values_reach_every_object_and_still_pass_the_schemas() -> None:
    objects = render_chart.objects(
        render_chart.render(NON_DEFAULT, name="gpu-obs", namespace="o11y")
    )
    validate_all(objects)
    assert {o["metadata"].get("namespace", "o11y") for o in objects} == {"o11y"}
    (binding,) = by_kind(objects, "ClusterRoleBinding")
    assert binding["subjects"][0]["namespace"] == "o11y"

    (ds,) = by_kind(objects, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"].endswith("moe-watch:0.1.0@sha256:" + "ab" * 32)
    assert container["args"][-2:] == ["--interval", "10"]
    assert pod["priorityClassName"] == "gpu-node-agents"
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"karpenter.sh/nodepool": "gpu"}
    assert "affinity" not in pod
    assert pod["tolerations"] == NON_DEFAULT["tolerations"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MOE_WATCH_WEB_CONFIG_FILE"] == "/etc/moe-watch/web/web-config.yml"
    assert env["MOE_WATCH_EXPERT_FULL_DETAIL"] == "true"
    assert container["livenessProbe"]["httpGet"]["scheme"] == "HTTPS"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["web-config"]["secret"]["secretName"] == "moe-watch-web"
    assert volumes["pod-resources"]["hostPath"]["path"] == "/var/lib/kubelet-custom/pod-resources"
    assert volumes["plans"]["configMap"]["name"] == "gpu-obs-moe-watch-plans"
    # the batching curves survive a new pod: a host directory (its owner is the node's job)
    assert volumes["state"]["hostPath"] == {"path": "/var/lib/moe-watch-state", "type": "Directory"}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["state"] == "/var/lib/moe-watch"

    configs = {c["metadata"]["name"]: c for c in by_kind(objects, "ConfigMap")}
    config = yaml.safe_load(configs["gpu-obs-moe-watch-config"]["data"]["config.yaml"])
    assert config["listen"] == "0.0.0.0:9555"  # `port` wins over a `config.listen`
    assert config["expert_top_n"] == 8
    assert config["state_dir"] == "/var/lib/moe-watch"  # the chart's default, kept beside them
    from moe_watch.sizing.plan import load_plan

    plan = configs["gpu-obs-moe-watch-plans"]["data"]["mixtral.yaml"]
    assert plan == NON_DEFAULT["plans"]["mixtral.yaml"]
    assert load_plan(ROOT / "deploy/examples/plans/example-mixtral.yaml").gpus == 2

    (monitor,) = by_kind(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kps"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert (endpoint["interval"], endpoint["scrapeTimeout"], endpoint["scheme"]) == (
        "30s",
        "20s",
        "https",
    )
    assert endpoint["honorLabels"] is True
    assert endpoint["relabelings"][0]["targetLabel"] == "node"
    assert endpoint["relabelings"][1]["targetLabel"] == "cluster"
    assert endpoint["basicAuth"]["username"]["name"] == "moe-watch-scrape"
    (rule,) = by_kind(objects, "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kps"
    dashboards = [c for c in configs.values() if "grafana_dashboard_moe" in c["metadata"]["labels"]]
    assert len(dashboards) == 4
    assert {d["metadata"]["annotations"]["grafana_folder"] for d in dashboards} == {"MoE"}


def test_runtime_class_security_contexts_and_service_type_reach_the_objects() -> None:
    values = {
        "runtimeClassName": "nvidia",
        "podResources": {"enabled": False},
        "podSecurityContext": {"fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
        # Helm merges maps: these override the defaults' uid 0, the rest stays
        "securityContext": {"runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True},
        "service": {"type": "NodePort", "nodePort": 30663},
    }
    objects = render_chart.objects(render_chart.render(values))
    validate_all(objects)
    (ds,) = by_kind(objects, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["securityContext"] == values["podSecurityContext"]
    (container,) = pod["containers"]
    assert container["securityContext"] == {
        "runAsUser": 65532, "runAsGroup": 65532, "runAsNonRoot": True,
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }  # fmt: skip
    (service,) = by_kind(objects, "Service")
    assert service["spec"]["type"] == "NodePort"
    assert "clusterIP" not in service["spec"]  # headless is ClusterIP's alone
    assert service["spec"]["externalTrafficPolicy"] == "Local"  # a node's port, that node's agent
    assert service["spec"]["ports"][0]["nodePort"] == 30663

    objects = render_chart.objects(render_chart.render({"service": {"type": "LoadBalancer"}}))
    validate_all(objects)
    (service,) = by_kind(objects, "Service")
    assert service["spec"]["type"] == "LoadBalancer"
    assert "nodePort" not in service["spec"]["ports"][0]  # null: the API server picks one

    (service,) = by_kind(render_chart.objects(render_chart.render()), "Service")
    assert (service["spec"]["type"], service["spec"]["clusterIP"]) == ("ClusterIP", "None")
    assert "externalTrafficPolicy" not in service["spec"]


def test_optional_objects_can_be_switched_off() -> None:
    off = {"serviceMonitor": {"enabled": False}, "prometheusRule": {"enabled": False},
           "dashboards": {"enabled": False}, "rbac": {"create": False},
           "serviceAccount": {"create": False, "name": "existing"}, "podResources": {"enabled": False}}  # fmt: skip
    objects = render_chart.objects(render_chart.render(off))
    assert {o["kind"] for o in objects} == {"ConfigMap", "Service", "DaemonSet"}
    validate_all(objects)
    (ds,) = by_kind(objects, "DaemonSet")
    assert ds["spec"]["template"]["spec"]["serviceAccountName"] == "existing"
    assert "pod-resources" not in {v["name"] for v in ds["spec"]["template"]["spec"]["volumes"]}


def test_rule_overrides_from_the_cli_replace_the_shipped_groups() -> None:
    from moe_watch.alerting.config import RulesConfig
    from moe_watch.alerting.rule_file import operator_manifest

    custom = operator_manifest(RulesConfig(additional_labels={"team": "ml-platform"}))
    objects = render_chart.objects(
        render_chart.render({"prometheusRule": {"manifest": yaml.safe_dump(custom)}})
    )
    (rule,) = by_kind(objects, "PrometheusRule")
    validate_all([rule])
    alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert alerts
    assert all(a["labels"]["team"] == "ml-platform" for a in alerts)
    with pytest.raises(helm.HelmRenderError, match="moe-watch rules --print prometheusrule"):
        render_chart.render({"prometheusRule": {"manifest": "groups: []"}})


def test_the_shipped_rules_are_the_generator_s() -> None:
    from moe_watch.alerting.rule_file import operator_manifest

    objects = render_chart.objects(render_chart.render())
    (rule,) = by_kind(objects, "PrometheusRule")
    assert rule["spec"] == operator_manifest()["spec"]


def test_the_crd_validator_rejects_what_the_operator_would() -> None:
    objects = render_chart.objects(render_chart.render())
    (monitor,) = by_kind(objects, "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["honorLabel"] = True  # a typo: unknown field
    with pytest.raises(jsonschema.ValidationError, match="honorLabel"):
        validate_crd(monitor)
    del monitor["spec"]["endpoints"][0]["honorLabel"]
    monitor["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError, match="15 seconds"):
        validate_crd(monitor)


# -- values.schema.json: bad values are refused at render, with the key named ----------------


@pytest.mark.parametrize(
    ("set_flags", "message"),
    [
        ("port=abc", r"at '/port': got string, want integer"),
        ("port=0", r"at '/port': minimum"),
        ("port=70000", r"at '/port': maximum"),
        ("hostPID=yes", r"at '/hostPID': got string, want boolean"),
        ("prot=9555", r"additional propert.*prot"),  # a typo is refused, not ignored
        ("serviceMonitor.interavl=30s", r"additional propert.*interavl"),
        ("serviceMonitor.interval=30 seconds", r"at '/serviceMonitor/interval'"),
        ("image.pullPolicy=Sometimes", r"at '/image/pullPolicy'"),
        ("image.digest=latest", r"at '/image/digest'"),
        ("runtimeClassName=Nvidia_GPU", r"at '/runtimeClassName'"),
        ("service.type=Headless", r"at '/service/type'"),
        ("service.nodePort=abc", r"at '/service/nodePort'"),
        ("tolerations.key=nvidia.com/gpu", r"at '/tolerations': got object, want array"),
        ("extraEnv[0].value=x", r"at '/extraEnv/0': missing propert.*name"),
        ("securityContext=root", r"at '/securityContext': got string, want object"),
        ("serviceMonitor.additionalLabels.release=1", r"additionalLabels/release': got number"),
    ],
)
def test_bad_values_are_refused_at_render_naming_the_key(set_flags: str, message: str) -> None:
    values = helm.parse_set_string(set_flags)  # what `helm --set` hands the chart
    with pytest.raises(helm.HelmValuesError, match=message):
        render_chart.render(values)


def test_the_schema_accepts_the_defaults_and_every_documented_form() -> None:
    good = [
        None,
        NON_DEFAULT,
        helm.parse_set_string("port=9555,runtimeClassName=nvidia,service.type=NodePort"),
        helm.parse_set_string("extraArgs={--interval,10}"),  # --set makes 10 a number
        {"affinity": None, "serviceAccount": {"name": "existing", "create": False}},
        {"global": {"imageRegistry": "example"}},  # a parent chart's globals
        {"securityContext": {"runAsUser": 65532, "runAsNonRoot": True},
         "podResources": {"enabled": False}},
    ]  # fmt: skip
    with helm.Chart.load(CHART) as chart:
        schema = chart.schema
        for values in good:
            chart.validate_schema(values)
    assert schema is not None
    # every top-level value is described, so a new one cannot skip the schema
    assert set(schema["properties"]) >= set(yaml.safe_load((CHART / "values.yaml").read_text()))
    assert schema["additionalProperties"] is False
