"""Draw each dashboard's panels from real query results (there is no Grafana server here).

Starts `moe-watch demo` (hot_expert) and a real Prometheus scraping it every second with the
shipped rules, lets them run for --seconds, then runs every panel's queries through the
Prometheus HTTP API (query_range for time series, instant queries otherwise) and draws the panels
in their dashboard layout with matplotlib: docs/dashboards/<name>.png.

    pip install matplotlib && python dashboards/render.py [--seconds 150]
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moe_watch.alerting.rule_file import render, rule_groups  # noqa: E402
from moe_watch.dashboards.build import substitute_all  # noqa: E402
from moe_watch.dashboards.definitions import DASHBOARDS  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def query(base: str, path: str, **params: Any) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.load(response)["data"]["result"]  # type: ignore[no-any-return]


def legend(template: str, labels: dict[str, str]) -> str:
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text or ", ".join(f"{k}={v}" for k, v in labels.items() if k != "__name__")


def _pivot(panel: dict[str, Any]) -> dict[str, Any] | None:
    """The groupingToMatrix options of a table panel, or None."""
    for transformation in panel.get("transformations", []):
        if transformation["id"] == "groupingToMatrix":
            return transformation["options"]  # type: ignore[no-any-return]
    return None


def draw(board: dict[str, Any], base: str, start: float, end: float, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in board["panels"])
    fig = plt.figure(figsize=(16, rows * 0.42))
    fig.suptitle(f"{board['title']} (moe-watch demo, hot_expert scenario)", fontsize=13)
    grid = fig.add_gridspec(rows, 24, hspace=2.5, wspace=1.2)
    for panel in board["panels"]:
        g = panel["gridPos"]
        if panel["type"] == "row":  # a row header (repeated per engine in Grafana): no data
            continue
        ax = fig.add_subplot(grid[g["y"] : g["y"] + g["h"] - 1, g["x"] : g["x"] + g["w"]])
        ax.set_title(panel["title"], fontsize=9, loc="left")
        ax.tick_params(labelsize=7)
        steps = [
            s
            for s in panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
            if s["value"] is not None
        ]
        if panel["type"] == "timeseries":
            for target in panel["targets"]:
                found = query(
                    base,
                    "query_range",
                    query=substitute_all(target["expr"]),
                    start=start,
                    end=end,
                    step=2,
                )
                found.sort(
                    key=lambda item: -max(float(v) for _, v in item["values"])
                )  # worst first
                for series in found[:8]:
                    xs = [float(t) - start for t, _ in series["values"]]
                    ax.plot(
                        xs,
                        [float(v) for _, v in series["values"]],
                        linewidth=1,
                        label=legend(target["legendFormat"], series["metric"]),
                    )
            for step in steps:
                ax.axhline(
                    step["value"],
                    color="red" if step["color"] == "red" else "orange",
                    linestyle="--",
                    linewidth=0.8,
                )
            ax.set_xlabel("seconds", fontsize=7)
            ax.legend(fontsize=6, loc="upper left", ncol=2)
        elif (pivot := _pivot(panel)) is not None:  # a groupingToMatrix table: draw the grid
            series = query(base, "query", query=substitute_all(panel["targets"][0]["expr"]))
            row_field, column_field = pivot["rowField"], pivot["columnField"]
            rows_ = sorted({int(s["metric"][row_field]) for s in series})
            columns = sorted({int(s["metric"][column_field]) for s in series})
            cells = [[float("nan")] * len(columns) for _ in rows_]
            for s in series:
                cells[rows_.index(int(s["metric"][row_field]))][
                    columns.index(int(s["metric"][column_field]))
                ] = float(s["value"][1])
            ids = panel["fieldConfig"]["defaults"]["unit"] == "none"
            image = ax.imshow(
                cells, aspect="auto", cmap="tab20" if ids else "inferno", origin="upper",
                interpolation="nearest",
            )  # fmt: skip
            small = len(rows_) * len(columns) <= 512
            if small:  # write each cell's value, as the Grafana table does
                for r, line in enumerate(cells):
                    for c, value in enumerate(line):
                        if value == value:
                            label = f"{value:.0f}" if ids else f"{value:.0%}"
                            ax.text(c, r, label, ha="center", va="center", fontsize=5, color="grey")
            ax.set_xticks(range(len(columns)), [str(c) for c in columns], fontsize=6)
            ax.set_xlabel(column_field.replace("_", " "), fontsize=7)
            ax.set_ylabel(row_field, fontsize=7)
            if not ids and not small:
                fig.colorbar(image, ax=ax, fraction=0.02)
        elif any(t["id"] == "merge" for t in panel.get("transformations", [])):
            # instant queries joined on their common labels, as Grafana's merge does
            keys = ("engine", "layer", "load_rank")
            joined: dict[tuple[str, ...], list[float]] = {}
            for index, target in enumerate(panel["targets"]):
                for s in query(base, "query", query=substitute_all(target["expr"])):
                    key = tuple(s["metric"].get(k, "") for k in keys)
                    joined.setdefault(key, [float("nan")] * len(panel["targets"]))[index] = float(
                        s["value"][1]
                    )
            ax.axis("off")
            ordered = sorted(joined.items(), key=lambda item: -item[1][0])[:10]
            text = "  share  engine / layer / load rank -> expert\n" + "\n".join(
                f"{v[0]:7.3f}  {' / '.join(k)} -> {v[1]:.0f}" for k, v in ordered
            )
            ax.text(0, 1, text, va="top", family="monospace", fontsize=7)
        else:  # table, bargauge: the instant values, worst first
            results = []
            for target in panel["targets"]:
                for s in query(base, "query", query=substitute_all(target["expr"])):
                    results.append(
                        (legend(target["legendFormat"], s["metric"]), float(s["value"][1]))
                    )
            results.sort(key=lambda item: -item[1])
            if panel["type"] == "bargauge":
                ax.barh(
                    [r[0] for r in results][:10][::-1],
                    [r[1] for r in results][:10][::-1],
                    color="tab:blue",
                )
                for step in steps:
                    ax.axvline(
                        step["value"],
                        color="red" if step["color"] == "red" else "orange",
                        linestyle="--",
                        linewidth=0.8,
                    )
            else:
                ax.axis("off")
                text = (
                    "\n".join(f"{value:10.3g}  {label[:90]}" for label, value in results[:10])
                    or "(no rows: healthy)"
                )
                ax.text(0, 1, text, va="top", family="monospace", fontsize=7)
    fig.savefig(out, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=150)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboards")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moe-watch-render-"))
    demo_port, prom_port = free_port(), free_port()
    (work / "rules.yml").write_text(render(rule_groups(interval="1s"), "render copy"))
    (work / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(work / "rules.yml")],
        "scrape_configs": [{"job_name": "moe-watch", "static_configs": [{"targets": [f"127.0.0.1:{demo_port}"]}]}],
    }))  # fmt: skip
    procs = [
        subprocess.Popen([sys.executable, "-m", "moe_watch.cli", "demo", "--listen", f"127.0.0.1:{demo_port}", "--interval", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
        subprocess.Popen([shutil.which("prometheus") or "prometheus", f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
    ]  # fmt: skip
    try:
        start = time.time()
        time.sleep(args.seconds)  # a script, not a test: let the series grow
        out_dir = args.out
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, make in DASHBOARDS.items():
            path = out_dir / f"{name}.png"
            draw(make(), f"http://127.0.0.1:{prom_port}", start + 5, time.time(), path)
            print(f"wrote {path}")
    finally:
        for proc in procs:
            proc.terminate()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
