"""``moe-watch``: run | demo | size | generate | rules | check.

``run`` the agent, ``demo`` it against a simulated engine and GPUs, ``size`` an MoE model for a
GPU, ``generate`` every generated file of the repository, write the ``rules`` with a site's
overrides, ``check`` a settings file. Exit status 2 means a bad setting (one line for each problem found).
``dashboards`` is kept for scripts that called it: it writes the dashboard part of ``generate``."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from moe_watch import __version__
from moe_watch.config import DEFAULT_PORT, ConfigError, Settings, load_settings

EXIT_BAD_CONFIG = 2


def _agent_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="YAML settings file (see docs/configuration.md)"
    )
    parser.add_argument("--listen", help=f"HOST:PORT for /metrics (default 0.0.0.0:{DEFAULT_PORT})")
    parser.add_argument(
        "--interval", type=float, dest="interval_seconds", help="seconds between cycles (default 5)"
    )
    parser.add_argument(
        "--window",
        type=float,
        dest="window_seconds",
        help="sliding window for rates and quantiles, seconds (default 300)",
    )
    parser.add_argument(
        "--nvml",
        choices=["auto", "off"],
        help="auto: read GPUs through NVML, reporting the source down where there is none (default)",
    )
    parser.add_argument("--log-format", choices=["auto", "json", "console"])
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a usage line, not a traceback, otherwise)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-watch",
        description="Per-node agent for Mixture-of-Experts LLM serving: NVML + engine /metrics -> Prometheus.",
    )
    parser.add_argument("--version", action="version", version=f"moe-watch {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the agent")
    run.add_argument(
        "--target",
        action="append",
        dest="targets",
        metavar="ENGINE_ID=URL",
        help="engine to scrape (repeatable), e.g. mixtral-0=http://127.0.0.1:8000",
    )
    _agent_options(run)

    demo = commands.add_parser(
        "demo", help="run the agent against a simulated MoE engine and simulated GPUs"
    )
    demo.add_argument(
        "--listen",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        help=f"HOST:PORT for the agent (default 127.0.0.1:{DEFAULT_PORT}; port 0 = any)",
    )
    demo.add_argument(
        "--duration",
        type=float,
        default=None,
        help="stop after this many seconds (default: until Ctrl-C)",
    )
    demo.add_argument(
        "--scenario",
        default="hot_expert",
        help="simulated engine scenario (default hot_expert: every expert alert fires; see --list-scenarios)",
    )
    demo.add_argument("--list-scenarios", action="store_true", help="print the scenarios and exit")
    demo.add_argument(
        "--interval",
        type=float,
        dest="interval_seconds",
        default=1.0,
        help="seconds between cycles (default 1)",
    )
    demo.add_argument(
        "--window",
        type=float,
        dest="window_seconds",
        default=60.0,
        help="sliding window for rates, quantiles and expert skew, seconds (default 60)",
    )
    demo.add_argument(
        "--pod",
        metavar="NAMESPACE/POD[/CONTAINER]",
        help="the simulated GPUs belong to this pod (container default vllm), served by a fake "
        "kubelet pod-resources API the agent reads; the engine is then named NAMESPACE/POD",
    )
    demo.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default="warning"
    )

    size = commands.add_parser("size", help="what an MoE model needs per GPU, and whether it fits")
    which = size.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a catalog model, e.g. mixtral-8x7b, deepseek-v3.2, kimi-k2")
    which.add_argument("--config", type=Path, dest="hf_config", help="a Hugging Face config.json")
    size.add_argument("--params-b", type=float, help="total parameters in billions (with --config)")
    size.add_argument("--dtype", help="weights: bf16, fp16, fp8, int8, int4 (default: the model's)")
    size.add_argument("--kv-dtype", default="bf16", help="KV cache dtype (default bf16)")
    size.add_argument(
        "--gpu",
        default="h100-80",
        help="a100-40|a100-80|h100-80|h200-141|b200-192|l40s-48|a10g-24|l4-24",
    )
    size.add_argument("--gpus", type=_positive_int, help="GPU count (default 1, or TP x DP x PP)")
    size.add_argument("--tp", type=_positive_int, help="tensor_parallel_size (default: picked)")
    size.add_argument("--dp", type=_positive_int, help="data_parallel_size: DP attention")
    size.add_argument("--pp", type=_positive_int, help="pipeline_parallel_size")
    size.add_argument(
        "--ep", type=_positive_int, help="expert-parallel ranks: TP x DP, or 1 for no EP"
    )
    size.add_argument(
        "--gpus-per-node", type=_positive_int, default=8, help="GPUs per node (default 8)"
    )
    size.add_argument("--max-model-len", type=_positive_int, default=8192)
    size.add_argument(
        "--max-num-seqs",
        type=_positive_int,
        default=8,
        help="concurrent sequences the deployment must hold (the target; default 8)",
    )
    size.add_argument(
        "--max-num-batched-tokens",
        type=_positive_int,
        help="vLLM's max_num_batched_tokens (sizes sliding windows; default: vLLM's for the GPU)",
    )
    size.add_argument(
        "--chunked-local-hybrid",
        action="store_true",
        help="size chunked local attention by its chunk, as vLLM does with "
        "VLLM_ALLOW_CHUNKED_LOCAL_ATTN_WITH_HYBRID_KV_CACHE=1 (default: as full attention)",
    )
    size.add_argument("--json", action="store_true", help="machine-readable output")

    generate = commands.add_parser(
        "generate",
        help="write every generated file: rules, promtool tests, PrometheusRule, dashboards, "
        "chart files, deploy/base, docs/thresholds.md (the shipped defaults)",
    )
    generate.add_argument(
        "--out", type=Path, default=Path("."), help="repository root to write under (default .)"
    )
    generate.add_argument(
        "--check",
        action="store_true",
        help="write nothing; list the files under --out that are missing or stale, exit 1 if any",
    )

    rules = commands.add_parser(
        "rules",
        help="write the Prometheus rules, their promtool tests and the PrometheusRule with a "
        "site's overrides",
    )
    rules.add_argument(
        "--out",
        type=Path,
        default=Path("."),
        help="root to write alerts/ and charts/moe-watch/files/ under (default .)",
    )
    rules.add_argument(
        "--config",
        type=Path,
        help="rules config YAML: thresholds, alerts, job_selector ... (docs/alerts.md)",
    )
    rules.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one setting, e.g. thresholds.expert_skew=0.6, alerts.MoEGPUUtilizationLow.enabled=false, job_selector='job=\"gpu-agents\"' (repeatable)",
    )
    rules.add_argument(
        "--print",
        choices=("rules", "tests", "prometheusrule"),
        dest="print_only",
        help="print one file to stdout instead of writing them",
    )

    dashboards = commands.add_parser(
        "dashboards", help="write the Grafana dashboards (JSON): the dashboard part of generate"
    )
    dashboards.add_argument(
        "--out", type=Path, default=Path("."), help="repository root (default .)"
    )

    check = commands.add_parser("check", help="validate a settings file and print the result")
    check.add_argument("--config", type=Path, required=True)
    return parser  # fmt: skip


def _settings_from(args: argparse.Namespace, **extra: Any) -> Settings:
    fields = {name: getattr(args, name, None) for name in Settings.model_fields}
    fields.update(extra)
    return load_settings(getattr(args, "config", None), **fields)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "demo":
            from moe_watch.demo.run import run_demo

            return int(run_demo(args))
        if args.command == "size":
            return _size(args)
        if args.command == "dashboards":
            from moe_watch.dashboards.definitions import generated_files as dashboard_files
            from moe_watch.generate import write

            for path in write(args.out, dashboard_files()):
                print(f"wrote {path}")
            return 0
        if args.command == "generate":
            return _generate(args)
        if args.command == "rules":
            return _rules(args)
        if args.command == "check":
            settings = _settings_from(args)
            print(f"ok: {args.config}: {len(settings.targets)} target(s), listen {settings.listen}")
            for target in settings.targets:
                print(f"  {target.name}: {target.url}{target.metrics_path} ({target.kind})")
            return 0
    except ConfigError as exc:
        for problem in exc.problems:  # every one, one line each
            print(f"moe-watch: {problem}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    raise AssertionError(f"unhandled command {args.command}")


def _rules(args: argparse.Namespace) -> int:
    from moe_watch.alerting.config import load_config
    from moe_watch.alerting.files import rule_files
    from moe_watch.alerting.promtool import check_rules
    from moe_watch.alerting.rule_file import OPERATOR_FILE, RULES_FILE, TESTS_FILE
    from moe_watch.generate import write

    try:
        config = load_config(args.config, args.set)
        files = rule_files(config)
        # Nothing is written or printed that Prometheus would refuse to load.
        if not check_rules(files[RULES_FILE]):
            print("moe-watch: promtool not on PATH: the rules were not checked", file=sys.stderr)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if args.print_only:
        path = {"rules": RULES_FILE, "tests": TESTS_FILE, "prometheusrule": OPERATOR_FILE}
        sys.stdout.write(files[path[args.print_only]])
        return 0
    for written in write(args.out, files):
        print(f"wrote {written}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from moe_watch.alerting.promtool import check_rules
    from moe_watch.alerting.rule_file import RULES_FILE
    from moe_watch.generate import generated_files, stale, write
    from moe_watch.generate.chart import ChartUnavailable

    try:
        files = generated_files()
        if not check_rules(files[RULES_FILE]):
            print("moe-watch: promtool not on PATH: the rules were not checked", file=sys.stderr)
    except (ChartUnavailable, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    if args.check:
        outdated = stale(args.out, files)
        for path in outdated:
            print(f"stale: {path} (run `moe-watch generate` and commit)")
        return 1 if outdated else 0
    for written in write(args.out, files):
        print(f"wrote {written}")
    return 0


def _size(args: argparse.Namespace) -> int:
    import json

    from moe_watch.sizing.budget import size
    from moe_watch.sizing.catalog import find_model, from_hf_config
    from moe_watch.sizing.report import render_plan

    try:
        spec = (
            from_hf_config(args.hf_config, args.params_b)
            if args.hf_config
            else find_model(args.model)
        )
        plan = size(
            spec,
            dtype=args.dtype,
            kv_dtype=args.kv_dtype,
            gpu=args.gpu,
            gpus=args.gpus,
            tp=args.tp,
            dp=args.dp,
            pp=args.pp,
            ep=args.ep,
            gpus_per_node=args.gpus_per_node,
            max_model_len=args.max_model_len,
            max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens,
            chunked_hybrid=args.chunked_local_hybrid,
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    print(json.dumps(plan.to_dict(), indent=2) if args.json else render_plan(plan))
    return 0


def _run(args: argparse.Namespace) -> int:
    from moe_watch.logs import configure_logging
    from moe_watch.serving.service import ListenError, install_stop_signals, serve

    settings = _settings_from(args)
    configure_logging(settings.log_format, settings.log_level)
    if not settings.targets and not settings.discovery and settings.nvml == "off":
        raise ConfigError(
            "invalid setting 'targets': nothing to watch (no targets, no discovery, nvml off)"
        )

    async def body() -> None:
        stop = asyncio.Event()
        install_stop_signals(stop)
        await serve(settings, stop=stop)

    try:
        asyncio.run(body())
    except ListenError as exc:
        print(f"moe-watch: {exc}", file=sys.stderr)
        return EXIT_BAD_CONFIG
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
