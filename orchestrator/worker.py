"""The per-worker training loop: a DeepSpeed ZeRO (or PyTorch DDP) engine running the ReLoRA recipe.

Ray Train runs `train_loop_per_worker` on every worker with torch.distributed already
set up (gloo on CPUs, nccl on GPUs). The loop, top to bottom:

    restore (or start)  ->  for each step: [wrap | restart]  ->  train step
                             -> report (loss, lr, tokens/s) -> eval -> checkpoint
                        ->  final eval, merged checkpoint

A restart is `relora.restart` with a generator seeded by (seed, step), so every rank
draws the same new adapters: merge, re-init, DeepSpeed's fp32 master copy of the adapters
overwritten (else its next step would undo the re-init), and the partial optimizer reset
on the adapters' own ZeRO partition.

GaLore, which ZeRO cannot run, trains on `orchestrator.ddp.DDPEngine` (`train.engine`), which
answers the same calls; the loop does not tell the two apart beyond building them. Each engine's
memory (parameters, gradients, optimizer state: `relora.memory_breakdown`) is measured once,
on its second step, and reported with tokens/s, so every method's cost sits beside its loss.
"""

from __future__ import annotations

import gc
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pyarrow.fs
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

import relora
from orchestrator.collectives import gather_across_ranks, gather_objects, init_deepspeed_comm, sum_across_ranks
from orchestrator.config import TrialConfig
from orchestrator.data import TRAIN, VALIDATION, PreparedData, ShardSampler, load_blocks, local_data
from orchestrator.ddp import DDPEngine
from orchestrator.search import SETTLED_STEP

HISTORY = "history.jsonl"  # every report of the run so far, carried inside each checkpoint
META = "meta.json"  # where the run stands: step, phase, restart count
# W at the switch to low rank, for the update rank (never a pickle). It never changes, so rank 0
# writes it once per trial, into the run's own folder on storage, not into every checkpoint.
START_WEIGHTS = "start_weights.safetensors"
DS_TAG = "deepspeed"
DDP_TAG = "ddp"
MEMORY_PREFIX = "memory_"  # memory_params_bytes, memory_grads_bytes, memory_optimizer_bytes, ...
LOCAL_FS = pyarrow.fs.LocalFileSystem()


def deepspeed_config(cfg: TrialConfig, *, bf16: bool) -> dict:
    return {
        "train_batch_size": cfg.train.global_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch_size,
        "gradient_accumulation_steps": cfg.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def read_history_file(checkpoint_dir: str) -> list[dict]:
    """Every report of the run so far, as kept in each of its checkpoints."""
    return [json.loads(line) for line in (Path(checkpoint_dir) / HISTORY).read_text().splitlines()]


class Worker:
    """One rank of one trial. Plain attributes, one method per stage of the loop."""

    def __init__(
        self,
        cfg: TrialConfig,
        data: PreparedData,
        report_fn,
        node_id: str = "",
        device: torch.device | None = None,
        run_storage: tuple | None = None,
    ) -> None:
        self.cfg = cfg
        # (pyarrow filesystem, folder) of this trial's run, where START_WEIGHTS is written once
        self.run_storage = run_storage
        self.node_id = node_id  # the Ray node this rank runs on, recorded with each start
        self.data = data
        self.report_fn = report_fn
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        # Ray Train's choice (`ray.train.torch.get_device()`): on a node whose workers share
        # CUDA_VISIBLE_DEVICES it is not always cuda:<local rank>.
        if device is None and torch.cuda.is_available():
            device = torch.device("cuda", torch.cuda.current_device())
        self.device = device or torch.device("cpu")
        precision = cfg.deepspeed.precision
        self.bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        blocks = load_blocks(data.path, cfg.data.cache_dir)
        self.train_blocks, self.val_blocks = blocks[TRAIN], blocks[VALIDATION]
        self.sampler = ShardSampler(len(self.train_blocks), rank=self.rank, world_size=self.world_size, seed=cfg.seed)
        self.samples_per_step = cfg.train.micro_batch_size * cfg.grad_accum_steps  # per worker
        torch.manual_seed(cfg.seed)  # the same initial model on every rank
        self.model = relora.build_model(
            cfg.model.name, vocab_size=data.vocab_size, max_position_embeddings=data.seq_len
        ).to(self.device)
        self.engine = None
        self.step = 0
        self.restarts = 0
        self.history: list[dict] = []
        # Where a trial's wall time goes (benchmarks/overhead.py): this process's start, the
        # start of its first optimizer step, and the seconds spent in optimizer steps.
        self.created_at = time.time()
        self.first_step_at: float | None = None
        self.train_seconds = 0.0
        self.low_rank = False
        self.start_weights: dict[str, torch.Tensor] | None = None  # rank 0's, on the host
        self.last_step_metrics: dict | None = None  # held back for the final report
        # Steps whose loss stays on the device until the next report reads it (one host sync
        # per report, not per step), and the seconds they took, which that read completes.
        self.unread_steps, self.unread_seconds = 0, 0.0
        self.flops_per_token, self.peak_flops = 0.0, None  # set with each engine
        # Each engine's memory is measured in its second step (the optimizer state exists by
        # then), and reported with the next report.
        self.memory_step: int | None = None
        self.memory: dict[str, float] = {}
        self.unreported_memory: dict[str, float] = {}

    @property
    def checkpoint_tag(self) -> str:
        return DDP_TAG if self.cfg.engine == "ddp" else DS_TAG

    # --- engine ----------------------------------------------------------------------

    def build_engine(self) -> None:
        """(Re-)create the engine (DeepSpeed, or DDP) for the current set of trainable parameters.

        The switch from the full-rank warm start to low rank changes which parameters
        train, and a ZeRO optimizer's flat partitions are fixed at creation, so the
        switch re-creates the engine (and the optimizer, as the paper's warm start does).
        """
        self.release_engine()
        c = self.cfg
        optimizer, scheduler = relora.make_optimizer(
            self.model,
            c.relora,
            lr=c.optim.lr,
            total_steps=c.train.total_steps,
            warmup_steps=c.optim.warmup_steps,
            min_lr_ratio=c.optim.min_lr_ratio,
            betas=c.optim.betas,
            weight_decay=c.optim.weight_decay,
            step=self.step,
        )
        if c.engine == "ddp":
            self.engine = DDPEngine(
                self.model,
                optimizer,
                scheduler,
                device=self.device,
                grad_accum_steps=c.grad_accum_steps,
                grad_clip=c.optim.grad_clip,
                bf16=self.bf16,
            )
        else:
            self.engine = self.deepspeed_engine(optimizer, scheduler)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)  # this engine's peak, not the last one's
        self.memory_step = self.step + 1
        # What a step costs (the switch to low rank changes it) and what the device could do.
        self.flops_per_token = relora.train_flops_per_token(self.model, self.data.seq_len)
        self.peak_flops = relora.peak_flops(self.device, bf16=self.bf16)

    def deepspeed_engine(self, optimizer, scheduler):
        import deepspeed

        # DeepSpeed puts the engine on cuda:<LOCAL_RANK> unless told the device: tell it ours.
        args = SimpleNamespace(device_rank=self.device.index) if self.device.type == "cuda" else None
        engine, _, _, _ = deepspeed.initialize(
            args=args,
            model=self.model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(self.cfg, bf16=self.bf16),
        )
        if engine.device != self.device:
            raise RuntimeError(f"DeepSpeed placed the engine on {engine.device}, the worker is on {self.device}")
        return engine

    def release_engine(self) -> None:
        """Free the old engine: DeepSpeed's `destroy()` leaves its forward hooks on the module."""
        if self.engine is None:
            return
        self.engine.destroy()
        for hook in ("module_forward_pre_hook", "module_forward_post_hook"):
            if getattr(self.engine, hook, None) is not None:
                getattr(self.engine, hook).remove()
                setattr(self.engine, hook, None)
        self.engine = None
        gc.collect()

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    # --- phases ----------------------------------------------------------------------

    def switch_to_low_rank(self) -> None:
        r = self.cfg.relora
        relora.wrap(
            self.model,
            rank=r.rank,
            alpha=r.alpha,
            dropout=r.dropout,
            target_modules=r.target_modules,
            trainable_scaling=r.trainable_scaling,
        )
        self.model.to(self.device)
        self.low_rank = True
        if self.rank == 0:  # only rank 0 computes update ranks: one host copy of W per trial, not per rank
            self.start_weights = {k: v.cpu() for k, v in relora.effective_weights(self.model).items()}
        self.build_engine()

    def save_start_weights(self) -> None:
        """Rank 0 writes W at the switch into the run's folder, once (a restart of the trial
        from before its first checkpoint writes the same values again)."""
        fs, folder = self.run_storage
        with tempfile.TemporaryDirectory() as tmp:
            save_file({k: v.contiguous() for k, v in self.start_weights.items()}, Path(tmp) / START_WEIGHTS)
            fs.create_dir(folder, recursive=True)
            pyarrow.fs.copy_files(f"{tmp}/{START_WEIGHTS}", f"{folder}/{START_WEIGHTS}", LOCAL_FS, fs)

    def load_start_weights(self, checkpoint_dir: str) -> dict[str, torch.Tensor]:
        """W at the switch: from the run's folder, or from a checkpoint written before it moved there."""
        old = Path(checkpoint_dir) / START_WEIGHTS
        if old.is_file():
            return load_file(old)
        fs, folder = self.run_storage
        with tempfile.TemporaryDirectory() as tmp:
            pyarrow.fs.copy_files(f"{folder}/{START_WEIGHTS}", f"{tmp}/{START_WEIGHTS}", fs, LOCAL_FS)
            return load_file(Path(tmp) / START_WEIGHTS)

    @torch.no_grad()
    def restart(self) -> dict:
        """`relora.restart` (merge, same re-init on every rank, fp32-master sync, partial reset)."""
        r = self.cfg.relora
        generator = torch.Generator(device=self.device).manual_seed(self.cfg.seed * 1_000_003 + self.step)
        done = relora.restart(
            self.model,
            self.engine.optimizer,  # a ZeRO optimizer (its fp32 masters are synced) or a torch one
            reset_ratio=r.reset_ratio,
            reset_method=r.reset_method,
            generator=generator,
        )
        zeroed_all = sum_across_ranks([done.reset_fraction], self.device)
        self.restarts += 1
        event = {
            "event": "restart",
            "at_step": self.step,
            "restarts": self.restarts,
            "merged_layers": done.merged_layers,
            "reset_fraction": zeroed_all.item() / self.world_size,
            "merge_lost_share": done.lost_share,  # of the update's norm, lost to rounding in the stored weights
            "weights_in_sync": self.weights_in_sync(),
        }
        if self.rank == 0:  # the SVDs once, not on every rank: Ray Train keeps rank 0's metrics
            ranks = relora.update_ranks(self.model, self.start_weights, threshold=self.cfg.train.update_rank_threshold)
            event["update_rank_max"] = max(ranks.values())
            event["update_rank_mean"] = sum(ranks.values()) / len(ranks)
            event.update({f"update_rank/{name}": value for name, value in ranks.items()})
        return event

    def weights_in_sync(self) -> bool:
        """Whether every rank holds bit-identical weights and merge residuals (a float64 checksum)."""
        tensors = [*self.model.parameters(), *self.model.buffers()]
        checksums = torch.stack([t.detach().double().abs().sum() for t in tensors])  # one per tensor
        gathered = gather_across_ranks(checksums, self.device)
        return bool((gathered == gathered[0]).all())

    def nodes(self) -> str:
        """The Ray nodes of all ranks, comma-separated: the tracker records where a trial ran."""
        return ",".join(sorted(set(gather_objects(self.node_id, self.device))))

    # --- steps and evals -------------------------------------------------------------

    def train_step(self) -> torch.Tensor:
        """One optimizer step over this worker's next samples.

        Returns the mean loss over all workers as a tensor on the device: reading it waits for
        the step to finish, so the loop reads it only when it reports.
        """
        indices = self.sampler.indices(self.step * self.samples_per_step, self.samples_per_step)
        micro_batches = self.train_blocks[indices].to(self.device).split(self.cfg.train.micro_batch_size)
        losses = []
        for index, micro in enumerate(micro_batches):
            loss = self.engine(input_ids=micro, labels=micro).loss
            self.engine.backward(loss)
            if self.step == self.memory_step and index == len(micro_batches) - 1:
                self.measure_memory()  # gradients of the whole step, optimizer state of the last
            self.engine.step()  # the engine steps the optimizer and LR at the accumulation boundary
            losses.append(loss.detach().float())
        return sum_across_ranks(torch.stack(losses).mean().reshape(1), self.device)[0] / self.world_size

    def measure_memory(self) -> None:
        """This rank's parameters, gradients and optimizer state in bytes, and on a GPU the
        device's peak allocation since the engine was built (activations included)."""
        usage = relora.memory_breakdown(self.model, self.engine.optimizer)
        usage["total_bytes"] = sum(usage.values())
        if self.device.type == "cuda":
            usage["device_peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
        self.memory = {f"{MEMORY_PREFIX}{name}": float(value) for name, value in usage.items()}
        self.unreported_memory = dict(self.memory)

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Token-weighted validation loss over the first `eval_blocks` blocks, split across workers."""
        count = (
            len(self.val_blocks)
            if not self.cfg.train.eval_blocks
            else min(self.cfg.train.eval_blocks, len(self.val_blocks))
        )
        mine = list(range(self.rank, count, self.world_size))
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)
        self.model.eval()  # the engine's module: ZeRO 1/2 keep whole weights on every rank
        for start in range(0, len(mine), self.cfg.train.micro_batch_size):
            ids = self.val_blocks[mine[start : start + self.cfg.train.micro_batch_size]].to(self.device)
            logits = self.model(input_ids=ids).logits[:, :-1].float()
            targets = ids[:, 1:]
            totals[0] += torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
            totals[1] += targets.numel()
        self.model.train()
        loss_sum, tokens = sum_across_ranks(totals, self.device).tolist()  # the one host read
        val_loss = loss_sum / tokens
        settled = {} if self.cfg.relora.rewarming_after(self.step) else {SETTLED_STEP: self.step}
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), **settled}

    # --- checkpoints -----------------------------------------------------------------

    def report(self, metrics: dict, *, checkpoint: bool = False, extra_files: dict | None = None) -> None:
        """Report ``metrics``, with a checkpoint folder if asked: ``report_fn`` owns that folder
        (Ray Train uploads it in the background and then deletes it)."""
        metrics = {"step": self.step, **metrics, "wall_time": time.time(), "train_seconds": self.train_seconds}
        self.history.append(metrics)
        if not checkpoint:
            self.report_fn(metrics, None)
            return
        tmp = tempfile.mkdtemp(prefix="relora-checkpoint-")
        if self.engine is not None:
            meta = {"step": self.step, "low_rank": self.low_rank, "restarts": self.restarts}
            self.engine.save_checkpoint(tmp, tag=self.checkpoint_tag, client_state=meta)
            if self.rank == 0:
                (Path(tmp) / META).write_text(json.dumps(meta))
        if self.rank == 0:
            (Path(tmp) / HISTORY).write_text("".join(json.dumps(h) + "\n" for h in self.history))
            for name, writer in (extra_files or {}).items():
                writer(Path(tmp) / name)
        self.report_fn(metrics, tmp)

    def restore(self, checkpoint_dir: str) -> None:
        """Continue from a checkpoint: same phase, same engine state, same sample."""
        meta = json.loads((Path(checkpoint_dir) / META).read_text())
        self.step, self.restarts = meta["step"], meta["restarts"]
        self.history = read_history_file(checkpoint_dir)
        self.train_seconds = self.history[-1].get("train_seconds", 0.0)
        if meta["low_rank"]:
            self.switch_to_low_rank()  # wraps and builds the low-rank engine; weights come next
            if self.rank == 0:
                self.start_weights = self.load_start_weights(checkpoint_dir)
        else:
            self.build_engine()
        self.engine.load_checkpoint(checkpoint_dir, tag=self.checkpoint_tag)

    # --- the loop --------------------------------------------------------------------

    def run(
        self,
        checkpoint_dir: str | None,
        *,
        warm_start: str | None = None,
        stop_at: int | None = None,
    ) -> None:
        """Train to the end, or only to ``stop_at`` (a shared warm start, saved for the trials)."""
        if checkpoint_dir and (Path(checkpoint_dir) / "merged").is_dir():
            self.report_finished(checkpoint_dir)
            return
        self.begin(checkpoint_dir, warm_start)
        end = stop_at or self.cfg.train.total_steps
        while self.step < end:
            if not self.advance(end):
                return
        if stop_at:
            self.finish_warm_start()
        else:
            self.finish()

    def begin(self, checkpoint_dir: str | None, warm_start: str | None) -> None:
        """Resume from a checkpoint, start from a shared warm start, or start afresh.

        ``warm_start`` is a folder of full-rank weights after ``relora.warm_start_steps``: the
        run starts there, at the switch, exactly where its own warm start would have ended
        (the switch re-creates the optimizer either way).
        """
        if checkpoint_dir:
            self.restore(checkpoint_dir)
            self.report({"event": "resume", "from_step": self.step, "nodes": self.nodes()})
        elif warm_start:
            self.model.load_state_dict(load_file(Path(warm_start) / "model.safetensors"))
            self.step = self.cfg.relora.warm_start_steps
            self.report({"event": "start", "from_warm_start": True, "nodes": self.nodes(), **self.evaluate()})
        else:
            self.build_engine()
            self.report({"event": "start", "lr": self.lr, "nodes": self.nodes(), **self.cost(), **self.evaluate()})

    def cost(self) -> dict:
        """FLOPs per token of a step and, where known, the peak FLOP/s of all ranks' devices."""
        peak = {} if self.peak_flops is None else {"peak_flops": self.peak_flops * self.world_size}
        return {"flops_per_token": self.flops_per_token, **peak}

    def scheduled_event(self) -> dict:
        """The switch to low rank or a restart, if one falls before this step."""
        relora_cfg = self.cfg.relora
        if relora_cfg.wraps_at(self.step):
            self.switch_to_low_rank()
            if self.rank == 0:
                self.save_start_weights()
            trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
            _, layer = next(relora.relora_layers(self.model))
            dtype = str(layer.weight.dtype).removeprefix("torch.")  # bfloat16 under DeepSpeed bf16
            return {
                "event": "switch",
                "at_step": self.step,
                "trainable_params": trainable,
                "weight_dtype": dtype,
                **self.cost(),
            }
        if relora_cfg.restarts_at(self.step):
            return self.restart()
        return {}

    def reports_after(self, step: int, end: int, event: dict) -> bool:
        """Whether the step that ends at ``step`` reports (and so reads its loss to the host)."""
        t = self.cfg.train
        periodic = any(step % every == 0 for every in (t.eval_every, t.checkpoint_every, t.log_every))
        return bool(event) or periodic or step in (end, t.total_steps)

    def advance(self, end: int) -> bool:
        """One optimizer step, with its event, report and checkpoint; False if the loss is not finite.

        Only a step that reports reads its loss (the wait for the device is timed with it), so
        speed is measured over the steps since the last report and a non-finite loss is caught
        at the next report, before any checkpoint is written.
        """
        c = self.cfg
        event = self.scheduled_event()
        lr = self.lr
        reports = self.reports_after(self.step + 1, end, event)
        started = time.perf_counter()
        loss_on_device = self.train_step()
        loss = loss_on_device.item() if reports else None
        elapsed = time.perf_counter() - started
        self.train_seconds += elapsed
        self.unread_steps, self.unread_seconds = self.unread_steps + 1, self.unread_seconds + elapsed
        self.first_step_at = self.first_step_at or time.time() - elapsed
        self.step += 1
        if not reports:
            return True
        if not math.isfinite(loss):
            # Stop, but do not raise: a retry from the last checkpoint would diverge the same way.
            self.report({"train_loss": loss, "stop_reason": f"non-finite training loss ({loss}) at step {self.step}"})
            return False
        tokens_per_s = self.unread_steps * c.train.global_batch_size * self.data.seq_len / self.unread_seconds
        self.unread_steps, self.unread_seconds = 0, 0.0
        metrics = {"train_loss": loss, "lr": lr, "tokens_per_s": tokens_per_s, **self.unreported_memory, **event}
        self.unreported_memory = {}
        utilisation = relora.mfu(tokens_per_s, self.flops_per_token, self.peak_flops, self.world_size)
        if utilisation is not None:  # none on CPUs: no made-up peak
            metrics["mfu"] = utilisation
        if self.step % c.train.eval_every == 0 or self.step == end:
            metrics.update(self.evaluate())
        if self.step == c.train.total_steps and not event:
            # The last step's metrics go out with the end of the run, in one report: a scheduler
            # that stops the trial at this report cannot cut it off before its merged checkpoint.
            self.last_step_metrics = metrics
            return True
        # A checkpoint rides on a report: a checkpoint step reports even between log steps.
        save = self.step % c.train.checkpoint_every == 0 and self.step < end
        self.report(metrics, checkpoint=save)
        return True

    def report_finished(self, checkpoint_dir: str) -> None:
        """The run had ended (its final checkpoint holds `merged/`) when it was interrupted:
        report that end again, so that Ray Train and Tune see the trial complete."""
        self.history = read_history_file(checkpoint_dir)
        final = self.history.pop()
        self.step = final.pop("step")
        merged = Path(checkpoint_dir) / "merged"
        self.report(final, checkpoint=True, extra_files={"merged": lambda path: shutil.copytree(merged, path)})

    def finish_warm_start(self) -> None:
        """Save the full-rank weights at the end of the warm start, for every trial to share."""
        self.release_engine()
        self.report(
            {"event": "warm_start_done"},
            checkpoint=True,
            extra_files={"warm_start": lambda path: self.model.to(torch.float32).save_pretrained(path)},
        )

    def finish(self) -> None:
        """The merged checkpoint: adapters folded in, saved as an MLflow `transformers` model whose
        `model/` folder is a plain Hugging Face model with its tokenizer."""
        last = self.last_step_metrics or {}
        final = last or self.history[-1]
        self.release_engine()
        model = relora.unwrap(self.model).to(torch.float32)

        def write_merged(path: Path) -> None:
            from transformers import AutoTokenizer

            from orchestrator.tracking import save_merged_model

            save_merged_model(model, AutoTokenizer.from_pretrained(self.data.tokenizer_path), path)

        summary = {
            **last,
            "event": "done",
            "final_val_loss": final.get("val_loss"),
            "final_val_ppl": final.get("val_ppl"),
            **self.memory,  # the last engine's: the low-rank phase's, after a warm start
            "worker_started_at": self.created_at,
            "first_step_at": self.first_step_at,
        }
        self.report(summary, checkpoint=True, extra_files={"merged": write_merged})


def train_loop_per_worker(config: dict) -> None:
    """Ray Train entry point; `config` holds the trial config and the prepared data."""
    import ray.train
    import ray.train.torch

    os.environ.setdefault("LOCAL_RANK", str(ray.train.get_context().get_local_rank()))  # DeepSpeed asserts on it
    cfg: TrialConfig = config["trial"]
    if cfg.engine == "deepspeed":  # DDP runs on the process group Ray Train made, without DeepSpeed's 3 s import
        init_deepspeed_comm()
    data = local_data(PreparedData(**config["data"]), cfg.data.cache_dir)

    checkpoint = ray.train.get_checkpoint()

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        """Every report in the background, in order (Ray Train keeps it): the training loop waits
        neither on the upload of a checkpoint nor on the controller taking the report; the
        uploaded folder is deleted here."""
        if metrics.get("event") == "resume":  # where the driver finds what was reported before
            metrics = {**metrics, "resumed_from": checkpoint.path}
        saved = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=saved, checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)

    # The device Ray Train gave this worker (it made it current); collectives run there too.
    device = ray.train.torch.get_device()
    storage = ray.train.get_context().get_storage()  # the run's folder, on the run's filesystem
    worker = Worker(
        cfg,
        data,
        report,
        node_id=ray.get_runtime_context().get_node_id(),
        device=device,
        run_storage=(storage.storage_filesystem, storage.experiment_fs_path),
    )
    options = {"stop_at": config.get("stop_at")}
    if checkpoint is not None:
        with checkpoint.as_directory() as checkpoint_dir:
            worker.run(checkpoint_dir, **options)
    elif config.get("warm_start"):
        with ray.train.Checkpoint(config["warm_start"]).as_directory() as warm_start:
            worker.run(None, warm_start=f"{warm_start}/warm_start", **options)
    else:
        worker.run(None, **options)
