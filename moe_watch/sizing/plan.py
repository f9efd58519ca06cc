"""Plan files: what one engine was sized for (YAML; a ConfigMap in Kubernetes).

```yaml
model: mixtral-8x7b          # a catalog name, or `config: path/to/config.json` with params_b
dtype: bf16
kv_dtype: bf16
gpu: h100-80
gpus: 2
tensor_parallel_size: 2      # optional, with data_parallel_size and pipeline_parallel_size:
expert_parallel: true        #   the layout (picked as `moe-watch size` does when absent)
vllm:                        # the settings the engine is expected to run with
  gpu_memory_utilization: 0.80
  max_num_seqs: 8            #   the deployment's target: vLLM's flag is this / DP per rank
  max_model_len: 8192
  enable_prefix_caching: true
```
Errors name the file and the line of the offending key; a layout vLLM cannot deploy is an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moe_watch.sizing.budget import Plan, gpu_memory_gb, size
from moe_watch.sizing.catalog import (
    DTYPE_BYTES,
    KV_DTYPE_BYTES,
    ModelSpec,
    find_model,
    from_hf_config,
)
from moe_watch.sizing.layout import GPUS_PER_NODE


class PlanError(ValueError):
    pass


class VllmSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)
    max_num_seqs: int | None = Field(default=None, ge=1)
    max_model_len: int | None = Field(default=None, ge=1)
    enable_prefix_caching: bool | None = None


class PlanFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    model: str | None = None
    config: Path | None = None
    params_b: float | None = Field(default=None, gt=0)
    dtype: str = "bf16"
    kv_dtype: str = "bf16"
    gpu: str = "h100-80"
    gpus: int = Field(default=1, ge=1)
    gpus_per_node: int = Field(default=GPUS_PER_NODE, ge=1)
    tensor_parallel_size: int | None = Field(default=None, ge=1)
    data_parallel_size: int | None = Field(default=None, ge=1)
    pipeline_parallel_size: int | None = Field(default=None, ge=1)
    expert_parallel: bool | None = None
    vllm: VllmSettings = VllmSettings()

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value.lower() not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {value!r} (one of {', '.join(DTYPE_BYTES)})")
        return value.lower()

    @field_validator("kv_dtype")
    @classmethod
    def _kv_dtype(cls, value: str) -> str:
        if value.lower() not in KV_DTYPE_BYTES:
            raise ValueError(
                f"unknown KV cache dtype {value!r} (one of {', '.join(KV_DTYPE_BYTES)})"
            )
        return value.lower()

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, value: str) -> str:
        gpu_memory_gb(value)  # raises with the list of known GPUs
        return value

    @field_validator("model")
    @classmethod
    def _model(cls, value: str | None) -> str | None:
        if value is not None:
            find_model(value)  # raises with the list of known models
        return value

    def spec(self, base: Path) -> ModelSpec:
        if self.model:
            return find_model(self.model)
        if self.config:
            return from_hf_config(
                self.config if self.config.is_absolute() else base / self.config, self.params_b
            )
        raise ValueError("a plan needs `model` (a catalog name) or `config` (a config.json path)")

    def sized(self, base: Path) -> Plan:
        settings = self.vllm
        return size(
            self.spec(base),
            dtype=self.dtype,
            kv_dtype=self.kv_dtype,
            gpu=self.gpu,
            gpus=self.gpus,
            tp=self.tensor_parallel_size,
            dp=self.data_parallel_size,
            pp=self.pipeline_parallel_size,
            ep=1 if self.expert_parallel is False else None,
            gpus_per_node=self.gpus_per_node,
            max_model_len=settings.max_model_len or 8192,
            max_num_seqs=settings.max_num_seqs or 8,
        )


def load_plan(path: Path) -> PlanFile:
    try:
        text = path.read_text(encoding="utf-8")
        node = yaml.compose(text)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{path}: cannot be read ({exc})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise PlanError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise PlanError(f"{path}: expected a mapping of plan settings")
    try:
        plan = PlanFile(**data)
        plan.sized(path.parent)  # the model resolves and the layout is deployable
        return plan
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = [str(part) for part in first["loc"]]
        message = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            message = "unknown plan setting (check the spelling)"
        raise PlanError(f"{path}:{_line_of(node, loc)}: {'.'.join(loc)}: {message}") from None
    except ValueError as exc:
        raise PlanError(f"{path}: {exc}") from None


def _line_of(node: Any, loc: list[str]) -> int:
    """The 1-based line of the key ``loc`` in the composed YAML (the mapping's line if absent)."""
    line = getattr(getattr(node, "start_mark", None), "line", 0) + 1
    for key in loc:
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == key:
                line, node = key_node.start_mark.line + 1, value_node
                break
        else:
            break
    return line
