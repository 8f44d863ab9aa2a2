"""Several processes, one run: launching, data sharding, rank-0-only writes and failure reports.

``tunelab train RECIPE --nproc N`` re-runs itself under accelerate's launcher (which is torchrun),
so process management, rendezvous and "one worker died, stop the others" are theirs, not ours.
Each worker runs the ordinary engine; this module holds what the engine needs to stay exact with
more than one process:

* every micro-batch of the single-process schedule is split across ranks (``indices[rank::W]``),
  so the union of the ranks' shards is exactly the micro-batch one process would use;
* the loss is normalised by the *global* unit count (all-reduced), and because DDP, FSDP and
  DeepSpeed average gradients over ranks, each rank scales its share by the world size: the update
  equals the single-process update, and so do the logged (all-reduced) losses;
* only rank 0 writes run files: other ranks get a :class:`FollowerRunDir` whose writers do nothing;
* a failing rank writes a one-line report into a directory the launching parent made; the parent
  names the first failing rank in the manifest (``error: "rank 1: ValueError: ..."``).

FSDP2 uses torch's own ``fully_shard`` (accelerate's FSDP plugin only engages on GPUs, so this one
path is also the one the CPU tests exercise). DeepSpeed goes through accelerate's plugin and is
used only when the ``deepspeed`` package is importable.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list, gather_object
from rich.console import Console
from torch import nn

from tunelab.console import labelled
from tunelab.runs.rundir import RunDir

FAILURE_DIR_ENV = "TUNELAB_FAILURE_DIR"
RANK_ENVS = ("RANK", "LOCAL_RANK", "WORLD_SIZE")


# --------------------------------------------------------------------------- launching (parent side)


def is_launched_worker() -> bool:
    """True inside a process started by accelerate launch / torchrun (so it must not launch again)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    """Rank 0 (or a single process): the one that writes files and prints the summary."""
    return int(os.environ.get("RANK", "0")) == 0


def free_port() -> int:
    """A port nobody listens on now, so two launches on one machine (e.g. parallel tests) do not collide."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(nproc: int, worker_args: list[str], port: int, script: str | None = None) -> list[str]:
    """``accelerate launch`` of ``python -m tunelab <worker_args>`` (or of ``script``) on this machine.

    ``--multi_gpu`` selects accelerate's torchrun-based launcher; on a machine without GPUs each
    worker then falls back to CPU processes joined by gloo (see :func:`use_cpu_backend`).
    """
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(nproc),
        "--num_machines",
        "1",
        "--machine_rank",
        "0",
        "--main_process_ip",
        "127.0.0.1",
        "--main_process_port",
        str(port),
        "--mixed_precision",
        "no",  # the recipe's training.mixed_precision decides, inside each worker
        "--dynamo_backend",
        "no",
        *(["--module", "tunelab"] if script is None else [script]),
        *worker_args,
    ]


def launch(
    nproc: int, worker_args: list[str], run_path: Path | None, console: Console, script: str | None = None
) -> int:
    """Run ``tunelab <worker_args>`` in ``nproc`` processes; on failure name the first failing rank.

    Returns the launcher's exit code. If the run's manifest was written by this launch, the
    failure is recorded there as ``status: failed`` with ``error: "rank R: ..."``.
    """
    with tempfile.TemporaryDirectory(prefix="tunelab-failures-") as failures:
        started = time.time()
        env = {**os.environ, FAILURE_DIR_ENV: failures}
        console.print(f"launching {nproc} processes: accelerate launch --num_processes {nproc}")
        code = subprocess.run(launch_command(nproc, worker_args, free_port(), script), env=env).returncode
        if code == 0:
            return 0
        failure = first_failure(Path(failures))
    message = describe_failure(failure, code)
    console.print(labelled("error", message))
    if run_path is not None:
        record_failure(run_path, message, since=started)
    return code or 1


@contextmanager
def reporting_failures() -> Iterator[None]:
    """In a launched worker, leave a report of an exception for the parent before re-raising it.

    The first report (by time) is the root cause: the other ranks fail later, when they notice a
    peer is gone, or are stopped by the launcher without a report.
    """
    try:
        yield
    except BaseException as err:
        directory = os.environ.get(FAILURE_DIR_ENV)
        if directory and Path(directory).is_dir():
            rank = int(os.environ.get("RANK", "0"))
            report = {"rank": rank, "time": time.time(), "error": f"{type(err).__name__}: {err}"[:2000]}
            (Path(directory) / f"rank-{rank}.json").write_text(json.dumps(report), encoding="utf-8")
        raise


def first_failure(directory: Path) -> dict[str, Any] | None:
    """The earliest failure report in ``directory``, or None if no rank left one."""
    reports = [json.loads(p.read_text(encoding="utf-8")) for p in sorted(directory.glob("rank-*.json"))]
    return min(reports, key=lambda r: (r["time"], r["rank"])) if reports else None


def describe_failure(failure: dict[str, Any] | None, code: int) -> str:
    if failure is None:
        return f"a worker process died without a report (launcher exit code {code}); see the log above"
    return f"rank {failure['rank']}: {failure['error']}"


def record_failure(run_path: Path, message: str, *, since: float) -> bool:
    """Mark the run failed with ``message`` if this launch wrote its manifest (never touch an older run's)."""
    run = RunDir(run_path)
    if not run.manifest_path.exists() or run.manifest_path.stat().st_mtime < since:
        return False
    run.set_status("failed", error=message)
    return True


# --------------------------------------------------------------------------- inside each worker


def use_cpu_backend(device: str) -> bool:
    """CPU processes (gloo) when the recipe asks for CPU, or when several processes run without an
    accelerator (accelerate would otherwise treat each worker as a separate single-process run)."""
    if device == "cpu":
        return True
    return world_size_from_env() > 1 and not torch.accelerator.is_available()


def process_state(device: str) -> PartialState:
    """The process group, created once and shared with the Accelerator built later."""
    return PartialState(cpu=use_cpu_backend(device))


def strategy_in_effect(cfg: Any, world_size: int) -> str:
    """The recipe's strategy; ``none`` with several processes is plain data parallel (DDP)."""
    if world_size == 1:
        return "none"
    return "ddp" if cfg.strategy == "none" else cfg.strategy


def strategy_options(training: Any, world_size: int) -> dict[str, Any]:
    """Extra ``Accelerator`` arguments for ``training.distributed`` (only DeepSpeed needs any).

    DeepSpeed steps its optimizer inside ``backward`` and scales the loss by its own accumulation
    count, so it gets one micro-batch per step and the recipe's clipping; untested here (no package).
    """
    cfg = training.distributed
    if strategy_in_effect(cfg, world_size) != "deepspeed":
        return {}
    try:
        import deepspeed  # noqa: F401, PLC0415  (optional; only this strategy needs it)
    except ImportError as err:
        raise ValueError(
            "training.distributed.strategy: deepspeed needs the deepspeed package (pip install deepspeed) "
            "and CUDA GPUs; it is not installed here. Use strategy: fsdp (built into PyTorch) instead."
        ) from err
    if training.grad_accum != 1:
        raise ValueError(
            "training.grad_accum: with strategy deepspeed use 1 and raise training.batch_size instead "
            "(DeepSpeed accumulates and rescales by itself)"
        )
    from accelerate.utils import DeepSpeedPlugin  # noqa: PLC0415

    ds = cfg.deepspeed
    plugin = DeepSpeedPlugin(
        zero_stage=ds.zero_stage,
        gradient_accumulation_steps=1,
        gradient_clipping=training.max_grad_norm,
        offload_optimizer_device="cpu" if ds.offload_optimizer else "none",
        offload_param_device="cpu" if ds.offload_params else "none",
        zero3_save_16bit_model=ds.zero_stage == 3,
    )
    return {"deepspeed_plugin": plugin}


def open_run_dir(
    root: str | Path, name: str, *, device: str, overwrite: bool = False, resume: bool = False
) -> RunDir:
    """Rank 0 creates (or reopens) the run directory and holds its lock; the others wait, then see it
    read-only (they take no lock: rank 0's stands for the whole launch, and a lock refused on rank 0
    ends the launch, as any rank-0 error does, so no rank waits on another's lock)."""
    state = process_state(device)
    if state.num_processes == 1:
        return RunDir.create(root, name, overwrite=overwrite, resume=resume, lock=True, keep_replaced=True)
    run = (
        RunDir.create(root, name, overwrite=overwrite, resume=resume, lock=True, keep_replaced=True)
        if state.is_main_process
        else None
    )
    state.wait_for_everyone()
    return run if run is not None else FollowerRunDir(Path(root) / name)


class FollowerRunDir(RunDir):
    """The run directory as ranks other than 0 see it: readable, and its writers do nothing.

    The engine calls the writers unconditionally, so one process writes each file once (one
    metrics line per step, one manifest) without ``if rank == 0`` at every call site.
    """

    is_writer = False

    def write_recipe(self, recipe: dict[str, Any]) -> Path:
        return self.recipe_path

    def write_manifest(self, manifest: dict[str, Any]) -> Path:
        return self.manifest_path

    def set_status(self, status: str, **extra: Any) -> dict[str, Any]:
        return {}

    def log_metrics(self, row: dict[str, Any]) -> None:
        return None

    def truncate_metrics_after(self, step: int) -> int:
        return 0

    def prune_checkpoints(self, keep_last: int) -> list[Path]:
        return []

    def discard(self) -> None:
        return None  # rank 0 removes the directory

    @contextmanager
    def writing_checkpoint(self, step: int, **meta: Any) -> Iterator[Path]:
        raise RuntimeError("only rank 0 writes checkpoints; a follower rank tried to (a bug in tunelab)")
        yield self.checkpoint_dir(step)  # pragma: no cover


def writes_files(run: RunDir) -> bool:
    return getattr(run, "is_writer", True)


def shard_micro_batch(indices: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of one micro-batch; the ranks' shares partition it exactly."""
    return indices[rank::world_size]


def global_sums(values: list[float]) -> list[float]:
    """Element-wise sums over all ranks (float64, so the sums are exact for unit and token counts)."""
    state = PartialState()
    if state.num_processes == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=state.device)
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.tolist()


def gathered(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (any picklable object)."""
    if PartialState().num_processes == 1:
        return [obj]
    return gather_object([obj])


def agreed(value: Any) -> Any:
    """Rank 0's ``value`` on every rank: decisions that must be identical (e.g. "does this
    checkpoint exist?") are taken once, even where ranks see the file system differently."""
    if PartialState().num_processes == 1:
        return value
    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def barrier() -> None:
    PartialState().wait_for_everyone()


def main_process_first() -> Any:
    """Rank 0 runs the block first, then the others (which then find its files in place)."""
    return PartialState().main_process_first()


def refuse_several_processes(what: str) -> None:
    if world_size_from_env() > 1:
        raise ValueError(f"{what} trains in one process; drop --nproc (or training.distributed.nproc)")


def saved_device(run_path: Path) -> str:
    """``model.device`` of a saved run's recipe, read before the process group exists (resume)."""
    import yaml  # noqa: PLC0415

    recipe_file = Path(run_path) / "recipe.yaml"
    if not recipe_file.is_file():
        return "auto"
    raw = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    return str((raw.get("model") or {}).get("device", "auto"))


# --------------------------------------------------------------------------- strategies


def prepare(accelerator: Any, model: nn.Module, optimizer: Any, strategy: str) -> tuple[Any, Any]:
    """Wrap for the strategy: accelerate wraps the model for DDP/DeepSpeed; an FSDP2 model is
    already sharded (accelerate would wrap it in DDP on CPU), so only the optimizer goes through."""
    if strategy == "fsdp":
        return model, accelerator.prepare(optimizer)
    return accelerator.prepare(model, optimizer)


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks, by the class names Hugging Face models list in ``_no_split_modules``."""
    names: set[str] = set()
    for module in model.modules():
        names |= set(getattr(module, "_no_split_modules", None) or [])
    return [m for m in model.modules() if type(m).__name__ in names]


def shard_fsdp2(prepared: Any, cfg: Any, mixed_precision: str) -> None:
    """Shard ``prepared.model`` in place with FSDP2 and point its optimizer groups at the shards.

    ``fully_shard`` replaces every parameter by a DTensor shard, so the groups the method built are
    re-pointed by parameter name (same names, new objects).
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard  # noqa: PLC0415

    model = prepared.model
    names = {id(p): n for n, p in model.named_parameters()}
    options: dict[str, Any] = {"reshard_after_forward": cfg.sharding == "full"}
    if cfg.cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
    if dtype is not None:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    if cfg.auto_wrap == "transformer_blocks":
        for block in transformer_blocks(model):
            fully_shard(block, **options)
    fully_shard(model, **options)
    by_name = dict(model.named_parameters())
    for group in prepared.param_groups:
        group["params"] = [by_name[names[id(p)]] for p in group["params"]]


def unsharded_twin(model: nn.Module) -> nn.Module | None:
    """On rank 0, a copy of the model before sharding, moved to the meta device (no memory).

    ``final/`` is written from this twin with the gathered weights loaded in, so every method's own
    save code (PEFT's ``save_pretrained``, custom artifacts) runs unchanged on whole tensors: no
    empty or partial adapter from saving shards. Costs one extra copy of the model on rank 0 while
    it is made.
    """
    if not PartialState().is_main_process:
        return None
    return copy.deepcopy(model).to("meta")


def consolidated(model: nn.Module, twin: nn.Module | None) -> nn.Module:
    """The model with whole weights, for writing ``final/``: itself unless FSDP-sharded; then
    every rank joins the gather and rank 0 gets the twin filled with the gathered weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: PLC0415

    from tunelab.train.checkpoint import is_sharded  # noqa: PLC0415  (checkpoint imports nothing from here)

    if not is_sharded(model):
        return model
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if twin is None:
        return model
    twin.load_state_dict(state, assign=True)
    return twin


# --------------------------------------------------------------------------- the `tunelab train` command


def processes_for(cli_nproc: int | None, recipe_nproc: int | None) -> int:
    """How many processes ``tunelab train`` starts: ``--nproc``, else the recipe's, else 1; always 1
    inside a launched worker (it must not launch again)."""
    if is_launched_worker():
        return 1
    return cli_nproc or recipe_nproc or 1


def saved_nproc(run_path: Path) -> int | None:
    """``training.distributed.nproc`` of a saved run (what ``--resume`` starts with by default)."""
    import yaml  # noqa: PLC0415

    recipe_file = Path(run_path) / "recipe.yaml"
    if not recipe_file.is_file():
        return None
    raw = yaml.safe_load(recipe_file.read_text(encoding="utf-8")) or {}
    return ((raw.get("training") or {}).get("distributed") or {}).get("nproc")


def worker_train_args(
    *,
    recipe: Path | None = None,
    overrides: list[str] | None = None,
    overwrite: bool = False,
    resume: Path | None = None,
) -> list[str]:
    """The ``tunelab train`` arguments each worker gets: the same run, without ``--nproc``."""
    if resume is not None:
        return ["train", "--resume", str(resume)]
    args = ["train", str(recipe)]
    for override in overrides or []:
        args += ["--set", override]
    return args + (["--overwrite"] if overwrite else [])
