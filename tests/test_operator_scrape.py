"""The Operator's scrape config (tests/operator_scrape.py) run by a real Prometheus: the labels on
`up` are the ones a cluster gives a moe-watch pod scraped through deploy/base/servicemonitor.yaml."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import yaml

from tests.alerting import Processes, binary, query, wait_until
from tests.conftest import EngineStub, free_port
from tests.operator_scrape import AgentPod, endpoints_targets, scrape_config

BODY = '# TYPE moe_watch_build_info gauge\nmoe_watch_build_info{version="test"} 1\n'


def test_the_scrape_config_has_the_operators_job_name_and_relabelings_in_order() -> None:
    pod = AgentPod("moe-watch-x7k2p", "gpu-node-a", "127.0.0.1:9663")
    config = scrape_config([pod])
    assert config["job_name"] == "serviceMonitor/monitoring/moe-watch/0"
    assert config["honor_labels"] is False
    assert (config["scrape_interval"], config["scrape_timeout"]) == ("15s", "10s")
    targets = [r.get("target_label") for r in config["relabel_configs"]]
    assert targets.index("namespace") < targets.index("job") < targets.index("endpoint")
    assert targets.index("endpoint") < targets.index("node", targets.index("endpoint"))
    (target,) = endpoints_targets([pod])
    labels = target["labels"]
    assert labels["__meta_kubernetes_service_label_app_kubernetes_io_name"] == "moe-watch"
    assert labels["__meta_kubernetes_endpoint_port_name"] == "metrics"
    assert labels["__meta_kubernetes_pod_container_port_number"] == "9663"
    assert scrape_config([pod], interval="1s")["scrape_timeout"] == "1s"


async def test_prometheus_labels_up_as_the_operator_would(
    tmp_path: Path, processes: Processes
) -> None:
    stub = EngineStub(BODY)
    await stub.start()
    try:
        address = stub.url.removeprefix("http://")
        pod = AgentPod("moe-watch-x7k2p", "gpu-node-a", address)
        config = tmp_path / "prometheus.yml"
        config.write_text(
            yaml.safe_dump(
                {
                    "global": {"scrape_interval": "1s"},
                    "scrape_configs": [scrape_config([pod], interval="1s")],
                }
            )
        )
        port = free_port()
        processes.start("prometheus", binary("prometheus"), f"--config.file={config}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{port}")  # fmt: skip
        async with aiohttp.ClientSession() as session:

            async def up() -> list[dict[str, Any]] | None:
                return await query(session, f"http://127.0.0.1:{port}", "up") or None

            (series,) = await wait_until(up, 30, "an up series", processes)
    finally:
        await stub.stop()
    assert series["metric"] == {
        "__name__": "up",
        "job": "moe-watch",  # jobLabel: the service's app.kubernetes.io/name
        "namespace": "monitoring",
        "service": "moe-watch",
        "pod": "moe-watch-x7k2p",
        "container": "moe-watch",
        "endpoint": "metrics",
        "node": "gpu-node-a",  # the ServiceMonitor's own relabeling
        "instance": address,
    }
    assert series["value"][1] == "1"
