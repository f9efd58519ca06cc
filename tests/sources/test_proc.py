"""/proc reads for GPU processes: the pod from the cgroup, the vLLM server command line from the
process tree, both off the event loop and soft on processes that vanished."""

from __future__ import annotations

from pathlib import Path

from moe_watch.drift import parse_vllm_args
from moe_watch.samples import ProcessInfo
from moe_watch.sources.base import Problems
from moe_watch.sources.cgroup import PodRef
from moe_watch.sources.proc import ProcSource, pod_of_pid, server_cmdline

UID = "3f2a1b7c-1234-4d5e-8f90-abcdef012345"
CID = "8b1a9953c4611296a827abf8c47804d7e6c49c6b3f0c7b0d7d5c1e0a9f8e7d6c"


def test_pod_of_pid_reads_proc_and_survives_a_vanished_process(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(f"0::/kubepods/burstable/pod{UID}/{CID}\n")
    assert pod_of_pid(42, str(tmp_path)) == PodRef(UID, CID)
    assert pod_of_pid(43, str(tmp_path)) is None


def test_the_server_command_line_is_found_from_a_gpu_worker_pid(tmp_path: Path) -> None:
    def process(pid: int, parent: int, argv: list[str]) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (VLLM::Worker 0) S {parent} 1 1 0 -1\n")

    server = [
        "python3",
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        "/models/mixtral",
        "--max-num-seqs",
        "8",
    ]
    process(100, 1, server)
    process(
        200,
        100,
        ["python3", "-c", "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5)"],
    )
    process(
        300,
        200,
        ["python3", "-c", "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=7)"],
    )
    assert server_cmdline(300, str(tmp_path)) == server
    assert server_cmdline(999, str(tmp_path)) is None
    assert parse_vllm_args(server)["--max-num-seqs"] == "8"


async def test_the_source_reports_pod_and_server_for_each_pid_it_is_given(tmp_path: Path) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(f"0::/kubepods/burstable/pod{UID}/{CID}\n")
    (tmp_path / "42" / "cmdline").write_bytes(b"vllm\0serve\0m\0--max-num-seqs\08\0")
    pids = [42, 43]
    source = ProcSource(lambda: pids, str(tmp_path))
    found = await source.collect(Problems())
    assert found == {
        42: ProcessInfo(UID, ("vllm", "serve", "m", "--max-num-seqs", "8")),
        43: ProcessInfo(None, None),  # gone, or not visible without hostPID: not an error
    }
    pids.clear()
    assert await source.collect(Problems()) == {}
