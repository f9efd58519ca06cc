"""The vLLM plugin's parts: registration (torch-free), the publisher, and the counter with torch.

The counter checks need torch; they run in tests/vllm_plugin_checks.py under an interpreter
that has it (this one, or the cached vLLM venv). The real-vLLM test is
tests/integration/test_vllm_experts.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from bench.vllm_env import torch_python
from moe_watch.expert_file import CountsFile, read_counts_file
from moe_watch.vllm_plugin.publisher import Publisher

ROOT = Path(__file__).resolve().parents[1]
CHECKS_SCRIPT = Path(__file__).with_name("vllm_plugin_checks.py")
CHECK_NAMES = re.findall(r"^@check\ndef (\w+)", CHECKS_SCRIPT.read_text(), flags=re.M)


# --- registration, against a stand-in vllm package (no torch, no vLLM) -----------------------

FAKE_WORKER = """
class _Model:  # a dense model: nothing to count
    def modules(self): return iter(())
class _Runner:
    def get_model(self): return _Model()
class Worker:
    vllm_config = None
    model_runner = _Runner()
    def load_model(self): return "loaded"
    def compile_or_warm_up_model(self): return "warm"
    def execute_model(self, scheduler_output): return "stepped"
    def execute_dummy_batch(self): return "dummy"
"""
FAKE_CPU_WORKER = """
from vllm.v1.worker.gpu_worker import Worker
class CPUWorker(Worker):
    def compile_or_warm_up_model(self): return "cpu warm"
"""


def fake_vllm(root: Path, *, with_xpu_class: bool) -> None:
    package = root / "vllm" / "v1" / "worker"
    package.mkdir(parents=True)
    (root / "vllm" / "__init__.py").write_text('__version__ = "9.9.9"\n')
    (root / "vllm" / "v1" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "gpu_worker.py").write_text(FAKE_WORKER)
    (package / "cpu_worker.py").write_text(FAKE_CPU_WORKER)
    (package / "xpu_worker.py").write_text("class XPUWorker:\n    pass\n" if with_xpu_class else "")


def run_python(code: str, root: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=root,
        env={"PYTHONPATH": f"{root}:{ROOT}", "PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


REGISTER_AND_IMPORT = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
import vllm.v1.worker.gpu_worker as early   # imported before the plugin loads
import moe_watch.vllm_plugin as plugin
plugin.register(); plugin.register()
import vllm.v1.worker.cpu_worker as cpu, vllm.v1.worker.xpu_worker as xpu
print("patched", early.Worker.__dict__.get("_moe_watch_patched", False),
      cpu.CPUWorker.__dict__.get("_moe_watch_patched", False))
w = cpu.CPUWorker()
print("calls", w.load_model(), w.compile_or_warm_up_model(), w.execute_model(None), w.execute_dummy_batch())
print("torch imported", "torch" in sys.modules)
"""


def test_register_patches_worker_classes_lazily_without_heavy_imports(tmp_path: Path) -> None:
    fake_vllm(tmp_path, with_xpu_class=True)
    result = run_python(REGISTER_AND_IMPORT, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "patched True True" in result.stdout
    # The wrapped methods behave as before when nothing is counted (no MoE model loaded).
    assert "calls loaded cpu warm stepped dummy" in result.stdout
    assert "torch imported False" in result.stdout
    assert "WARNING" not in result.stderr


def test_a_missing_hook_point_is_one_warning_naming_the_vllm_version(tmp_path: Path) -> None:
    fake_vllm(tmp_path, with_xpu_class=False)
    result = run_python(REGISTER_AND_IMPORT, tmp_path)
    assert result.returncode == 0, result.stderr  # serving goes on
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1, result.stderr
    assert "vLLM 9.9.9" in warnings[0]
    assert "XPUWorker" in warnings[0]


def test_moe_watch_plugin_0_switches_it_off(tmp_path: Path) -> None:
    fake_vllm(tmp_path, with_xpu_class=True)
    result = run_python(REGISTER_AND_IMPORT, tmp_path, MOE_WATCH_PLUGIN="0")
    assert result.returncode == 0, result.stderr
    assert "patched False False" in result.stdout


# --- pure parts ------------------------------------------------------------------------------


def counts_file(value: int) -> CountsFile:
    return CountsFile(
        pid=1,
        started=1.0,
        updated=2.0,
        model="m",
        top_k=1,
        num_experts=2,
        layers=[0],
        counts=[[value, 0]],
    )


def test_publisher_writes_retries_a_failing_directory_and_removes_its_file(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the directory should be")
    failing = Publisher(blocked / "w.experts.json", 60.0, lambda: counts_file(1))
    assert failing.publish_once()
    assert failing.publish_once()  # keeps trying
    assert failing.writes == 0
    assert len([r for r in caplog.records if "cannot write" in r.getMessage()]) == 1

    path = tmp_path / "experts" / "w.experts.json"
    value = [5]
    publisher = Publisher(path, 60.0, lambda: counts_file(value[0]))
    assert publisher.publish_once()
    assert read_counts_file(path).counts == [[5, 0]]
    value[0] = 7
    assert publisher.publish_once()
    assert read_counts_file(path).counts == [[7, 0]]
    publisher.close()
    assert not path.exists()


def test_publisher_stops_on_an_unexpected_write_error_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = counts_file(1)
    object.__setattr__(bad, "model", object())  # json cannot encode it: a bug, not the volume
    publisher = Publisher(tmp_path / "w.experts.json", 60.0, lambda: bad)
    assert not publisher.publish_once()  # stop: no retrying every interval
    assert (
        len([r for r in caplog.records if "writing the expert counts failed" in r.getMessage()])
        == 1
    )
    assert not list(tmp_path.iterdir())  # the temporary file is cleaned up


def test_publisher_thread_stops_and_cleans_up_when_counting_stops(tmp_path: Path) -> None:
    path = tmp_path / "w.experts.json"
    written = threading.Event()
    stop = threading.Event()

    def snapshot() -> CountsFile | None:
        if stop.is_set():
            return None  # the counter failed: nothing more to publish
        written.set()
        return counts_file(3)

    publisher = Publisher(path, 0.01, snapshot)
    publisher.start()
    assert written.wait(30)
    stop.set()
    assert publisher._thread is not None
    publisher._thread.join(30)
    assert not publisher._thread.is_alive()
    assert not path.exists()


# --- the counter, with torch -------------------------------------------------------------------


@pytest.fixture(scope="module")
def check_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("plugin-checks") / "results.json"
    result = subprocess.run(
        [str(torch_python()), str(CHECKS_SCRIPT), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results: dict[str, str] = json.loads(out.read_text())
    return results


def test_every_check_is_collected() -> None:
    assert len(CHECK_NAMES) >= 15


@pytest.mark.torch
@pytest.mark.parametrize("name", CHECK_NAMES)
def test_counter(check_results: dict[str, str], name: str) -> None:
    assert check_results.get(name) == "ok", check_results.get(name, "not run")
