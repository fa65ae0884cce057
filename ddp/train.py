"""Train CIFAR-10 (or CIFAR-100, or your own model) with DistributedDataParallel.

    torchrun --standalone --nproc_per_node=2 -m ddp.train --dataset synthetic --epochs 2
    python -m ddp.train --help

Every rank runs this file top to bottom. Rank 0 prints, writes TensorBoard and checkpoints; the
ranks meet in DDP's gradient all-reduce and in a few small collectives (logging, evaluation, saving).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from ddp import checkpoint, config, data, models, versions
from ddp.dist import (
    Context,
    LostPeerError,
    PeerFailedError,
    StopSignals,
    all_reduce_sum,
    log,
    lost_peer,
    process_group,
    run_and_agree,
    sync_buffers,
)
from ddp.evaluate import evaluate
from ddp.monitor import Monitor, fresh_run_name
from ddp.optim import Lookahead, autocast, autocast_dtype, build_optimizer, build_scheduler, freeze_whiten_bias
from ddp.resume import find_resume_checkpoint, init_from

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped by a signal after saving; run again to continue
STOP_CHECK_EVERY = 10  # steps between checks for a stop signal: each check is a (tiny) collective


class Stopped(Exception):
    """Raised on every rank at once: for a signal (exit with PREEMPTED_EXIT_CODE) or --stop-at-step (return)."""

    def __init__(self, signal_name: str | None):
        super().__init__(signal_name)
        self.signal_name = signal_name


def load_datasets(args: argparse.Namespace, ctx: Context) -> tuple[torch.Tensor, ...]:
    """(train images, train labels, test images, test labels) as uint8/int64 tensors on the device."""
    if args.download and args.dataset in data.DATASETS:  # one download per node: data may be node-local
        run_and_agree(lambda: data.download(args.dataset, args.data_dir), here=ctx.local_rank == 0, device=ctx.device)
    train, test = (data.load_split(args.dataset, args.data_dir, args.synthetic_size, split) for split in (True, False))
    # The whole data set is 180 MB of uint8: keep it on the training device, index batches from it.
    return tuple(t.to(ctx.device) for t in (*train, *test))


def position(epoch: int, batch_in_epoch: int) -> str:
    """Where training is, as the logs say it: "epoch 3" (3 done) or "epoch 3 + 40 batches"."""
    return f"epoch {epoch}" + (f" + {batch_in_epoch} batches" if batch_in_epoch else "")


def train(args: argparse.Namespace, ctx: Context) -> dict[str, float]:
    """Train while rank 0 holds --checkpoint-dir's lock: a second run there stops on every rank, having read nothing."""
    with contextlib.ExitStack() as held:
        def lock() -> None:
            run_lock = held.enter_context(checkpoint.hold_run_lock(args.checkpoint_dir))
            if run_lock.removed:  # what writers killed mid-save left behind; never a checkpoint's real name
                log(f"removed {len(run_lock.removed)} stale temporary file(s) from {args.checkpoint_dir}/: "
                    f"{', '.join(run_lock.removed)}")
            if not run_lock.locked:
                log(f"warning: {args.checkpoint_dir}/ is not locked ({checkpoint.NO_LOCK_ENV}=1): make sure no "
                    "other run uses it")

        run_and_agree(lock, here=ctx.is_main, device=ctx.device)  # a refusal ends every rank, none waits
        return _train(args, ctx)


def _train(args: argparse.Namespace, ctx: Context) -> dict[str, float]:
    # Every rank reads the checkpoint to resume from, if any, straight onto its own device; its config
    # names the model, the dataset and the TensorBoard run when the flags leave them out.
    resumed = find_resume_checkpoint(args, ctx)
    config.resolve(args, resumed[1]["config"] if resumed else None)
    if not resumed:
        args.run_name = fresh_run_name(args.logdir, args.run_name)  # never append to an earlier run's events
    torch.manual_seed(args.seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    train_x, train_y, test_x, test_y = load_datasets(args, ctx)
    if args.dataset == "synthetic":
        log("NOTE: training on SYNTHETIC data, not CIFAR: accuracies say nothing about CIFAR")

    # The model, initialised; a resume below overwrites every weight. Built before DDP wraps it.
    num_classes = data.num_classes(args.dataset)
    model = models.build(args.model, num_classes).to(ctx.device, memory_format=torch.channels_last)
    if not resumed:
        if hasattr(model, "init_whitening"):
            model.init_whitening(data.normalize(train_x[:5000]))
        if args.init_from:
            init_from(args, model, ctx)

    per_rank_batch = args.batch_size // ctx.world_size
    steps_per_epoch = len(train_x) // args.batch_size
    total_steps = math.ceil(round(args.epochs * steps_per_epoch, 6))  # --epochs 7.5: the last epoch stops halfway
    epochs = math.ceil(total_steps / steps_per_epoch)  # epochs begun, the last one perhaps partial
    optimizer = build_optimizer(model, args)
    scheduler = build_scheduler(optimizer, round(args.warmup_epochs * steps_per_epoch), total_steps,
                                args.whiten_bias_epochs * steps_per_epoch)
    lookahead = Lookahead(model, total_steps) if args.lookahead else None
    amp_dtype = autocast_dtype(args.amp, ctx.device)
    scaler = torch.amp.GradScaler(ctx.device.type, enabled=amp_dtype == torch.float16)  # bf16 needs no scaling
    criterion = nn.CrossEntropyLoss(label_smoothing=args.label_smoothing)

    # Resume everything, or start fresh.
    epoch, batch_in_epoch, step = 0, 0, 0
    metrics = {"best_acc": 0.0, "acc": math.nan, "loss": math.nan}
    if resumed:
        path, ckpt = resumed
        checkpoint.restore_checkpoint(ckpt, model, optimizer, scheduler, scaler, lookahead)
        checkpoint.restore_rng(ckpt["rng"])
        epoch, batch_in_epoch, step = (ckpt["progress"][k] for k in ("epoch", "batch_in_epoch", "step"))
        metrics.update({k: v for k, v in ckpt["metrics"].items() if v is not None})
        saved = ckpt["env"]
        log(f"resumed from {path}: {position(epoch, batch_in_epoch)}, step {step}, best acc "
            f"{100 * metrics['best_acc']:.2f}% (saved by {saved['world_size']} x {saved['device']}, "
            f"now {ctx.world_size} x {ctx.device.type})")
        changed = [f"--{k.replace('_', '-')} {v!r} -> {getattr(args, k)!r}" for k, v in ckpt["config"].items()
                   if k in config.RECIPE_FLAGS and v != getattr(args, k)]
        if changed:
            log(f"note: flags changed since the checkpoint: {', '.join(changed)}")

    def wrap(model: nn.Module) -> nn.Module:
        """DDP (hooked on the parameters that train now), compiled with --compile."""
        ddp_model = DDP(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None)
        return torch.compile(ddp_model) if args.compile else ddp_model

    freeze_whiten_bias(model, epoch, args.whiten_bias_epochs)
    train_model = wrap(model)

    log(f"world {ctx.world_size} x {ctx.device.type} ({ctx.backend}) | {args.model}: "
        f"{sum(p.numel() for p in model.parameters()):,} parameters "
        f"({sum(p.numel() for p in model.parameters() if p.requires_grad):,} trained) | {args.dataset}: "
        f"{len(train_x)} train / {len(test_x)} test images | batch {args.batch_size} global = "
        f"{ctx.world_size} x {per_rank_batch} | {steps_per_epoch} steps/epoch, {total_steps} in all | "
        f"{'float32' if amp_dtype is None else str(amp_dtype).removeprefix('torch.') + ' autocast'}"
        + (f" | Newton-Schulz in {str(optimizer.ns_dtype).removeprefix('torch.')}" if args.optimizer == "muon" else ""))
    if epoch >= epochs:
        log(f"nothing to do: the checkpoint has {epoch} epochs and --epochs is {args.epochs}")

    writer = checkpoint.BackgroundWriter()  # rank 0's: one checkpoint write at a time, off the training thread
    unchecked = False  # on every rank: a background write went off and no collective has reported on it yet

    def save(*names: str, wait: bool = False) -> None:
        """Rank 0 copies the state to the CPU, the only part training waits for, and writes `names` in the background.

        Every rank learns here whether the previous write worked (a failed write stops every rank), and with
        `wait` (the run's last save, a save before stopping) whether this one did.
        """
        nonlocal unchecked
        if not names and not unchecked:
            return

        def write() -> None:
            writer.wait()  # never two writes in flight; raises the previous write's error
            if names:
                ckpt = checkpoint.cpu_copy(checkpoint.make_checkpoint(
                    model, optimizer, scheduler, scaler, lookahead,
                    progress={"epoch": epoch, "step": step, "batch_in_epoch": batch_in_epoch},
                    metrics=metrics, config={**config.to_dict(args), "num_classes": num_classes},
                    world_size=ctx.world_size, device_type=ctx.device.type))
                paths = [Path(args.checkpoint_dir) / name for name in names]

                def write_files() -> None:
                    checkpoint.save_checkpoint(ckpt, *paths)
                    checkpoint.prune_epoch_checkpoints(args.checkpoint_dir, args.keep)  # now: the new file is written

                writer.submit(write_files)
            if wait:
                writer.wait()

        run_and_agree(write, here=ctx.is_main, device=ctx.device)
        unchecked = bool(names) and not wait

    def stop_if_asked(latest_is_saved: bool = False) -> None:
        """At a step boundary: if any rank got a stop signal, or --stop-at-step is reached, save and stop."""
        received = stop_signals.agree(ctx.device)
        if not received and step != args.stop_at_step:
            return
        save(*([] if latest_is_saved else [checkpoint.LATEST_NAME]), wait=True)  # on disk before we stop
        log(f"stopping at {position(epoch, batch_in_epoch)}, step {step} ({received or '--stop-at-step'}): saved "
            f"{args.checkpoint_dir}/{checkpoint.LATEST_NAME}; run again with --resume auto to continue")
        raise Stopped(received)

    monitor = Monitor(ctx.is_main, args.logdir, args.run_name, config.to_dict(args),
                      note="SYNTHETIC data, not CIFAR" if args.dataset == "synthetic" else "")
    log(f"TensorBoard: {Path(args.logdir) / args.run_name}")
    stop_signals = StopSignals()
    train_loss = math.nan  # until the first logged step (a resumed epoch may have no steps left)
    try:
        while epoch < epochs:
            if freeze_whiten_bias(model, epoch, args.whiten_bias_epochs):
                train_model = wrap(model)
            order = data.shard_epoch(len(train_x), args.batch_size, ctx.world_size, ctx.rank, args.seed, epoch)
            flips = data.epoch_flips(len(train_x), args.seed, epoch).to(ctx.device)
            model.train()
            epoch_steps = min(steps_per_epoch, total_steps - epoch * steps_per_epoch)
            monitor.start_epoch(epoch, epochs, epoch_steps, done=batch_in_epoch)
            t0, first_batch = time.perf_counter(), batch_in_epoch
            running = torch.zeros(2, dtype=torch.float64, device=ctx.device)  # loss sum, steps
            while batch_in_epoch < epoch_steps:  # a resumed epoch skips the batches already consumed
                idx = order[batch_in_epoch].to(ctx.device)
                generator = data.make_generator(args.seed, epoch, batch_in_epoch, ctx.rank)
                x, y = data.normalize(data.augment(train_x[idx], generator, flips[idx])), train_y[idx]
                if args.brightness or args.contrast:
                    x = data.jitter(x, generator, args.brightness, args.contrast)
                with autocast(ctx.device, amp_dtype):
                    loss = criterion(train_model(x), y)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()  # DDP all-reduces gradients here, overlapped with backward
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step, batch_in_epoch = step + 1, batch_in_epoch + 1
                if lookahead:
                    lookahead.step(step)
                running += torch.stack([loss.detach().double(), torch.ones_like(running[0])])
                monitor.advance()
                end_of_epoch = batch_in_epoch == epoch_steps
                if step % args.log_every == 0 or end_of_epoch:
                    loss_sum, count = all_reduce_sum(running.tolist(), ctx.device)
                    running.zero_()
                    train_loss = loss_sum / count
                    monitor.scalars(step, {"train/loss": train_loss, "train/lr": scheduler.get_last_lr()[0]})
                if end_of_epoch:
                    break  # the epoch's own bookkeeping below saves and checks for a stop
                saved = args.save_every_steps and step % args.save_every_steps == 0
                if saved:
                    save(checkpoint.LATEST_NAME)
                # Preemption: every few steps the ranks agree on whether any of them got a signal.
                if step % STOP_CHECK_EVERY == 0 or step == args.stop_at_step:
                    stop_if_asked(latest_is_saved=saved)
            train_time = time.perf_counter() - t0
            monitor.end_epoch()
            epoch, batch_in_epoch = epoch + 1, 0

            line = f"epoch {epoch}/{epochs} | train loss {train_loss:.4f}"
            files = []
            if epoch == epochs or (args.eval_every and epoch % args.eval_every == 0):
                sync_buffers(model)
                tta = args.tta if epoch == epochs else "none"  # test-time augmentation only at the end
                metrics["loss"], metrics["acc"] = evaluate(model, test_x, test_y, ctx, amp_dtype, tta)
                if metrics["acc"] > metrics["best_acc"]:
                    metrics["best_acc"] = metrics["acc"]
                    files.append(checkpoint.BEST_NAME)
                monitor.scalars(step, {"test/loss": metrics["loss"], "test/acc": metrics["acc"]})
                line += f" | test loss {metrics['loss']:.4f} acc {100 * metrics['acc']:.2f}% ({'no' if tta == 'none' else tta} TTA)"
            periodic = epoch % args.save_every == 0 or epoch == epochs
            if periodic:
                files += [checkpoint.epoch_checkpoint_name(epoch), checkpoint.LATEST_NAME]
            save(*files, wait=epoch == epochs)  # the run's last save is on disk before train() returns
            epoch_time = time.perf_counter() - t0
            images_per_sec = (epoch_steps - first_batch) * args.batch_size / train_time
            monitor.scalars(step, {"perf/images_per_sec": images_per_sec, "perf/epoch_time_s": epoch_time})
            log(f"{line} | {images_per_sec:.0f} img/s | {epoch_time:.1f}s")
            if epoch < epochs:
                stop_if_asked(latest_is_saved=periodic)
        save(wait=True)  # nothing is left in flight (already so after the last epoch's save)
        monitor.final(step, {**metrics, "train_loss": train_loss})
    except Stopped as stop:
        if stop.signal_name:
            raise  # main() exits with PREEMPTED_EXIT_CODE
    except (RuntimeError, dist.DistError) as e:
        if (lost := lost_peer(e)) is None:
            raise
        raise LostPeerError(f"at {position(epoch, batch_in_epoch)}, step {step} ({lost})") from e  # what a restart redoes
    finally:
        try:  # leaving with an error: a write in flight still finishes; if it fails too, say so
            writer.wait()
        except Exception as e:  # noqa: BLE001 -- the error already on its way out is the one to raise
            log(f"error: {e}")
        monitor.close()
    return metrics


def main(argv: list[str] | None = None) -> None:
    versions.require("python -m ddp.train")  # before anything that an old torch lacks
    args = config.parse_args(argv)  # bad flags exit here, before any process group exists
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts: cuBLAS needs it
    try:
        with process_group(args.device, args.backend, args.timeout_min) as ctx:
            torch.use_deterministic_algorithms(args.deterministic)
            torch.backends.cudnn.benchmark = not args.deterministic
            train(args, ctx)
    except Stopped:
        StopSignals.ignore()  # saved already; exit with our code, not killed by a late signal
        sys.exit(PREEMPTED_EXIT_CODE)
    except (checkpoint.CheckpointError, data.DataError, FileNotFoundError, PeerFailedError) as e:
        # Problems with the user's files: one line, no traceback. Anything else is a bug: traceback.
        log(f"error: {e}", every_rank=True)
        sys.exit(1)
    except (LostPeerError, RuntimeError, dist.DistError) as e:
        where = str(e) if isinstance(e, LostPeerError) else lost_peer(e) and f"({lost_peer(e)})"
        if not where:
            raise  # not a lost peer: a bug, with its traceback
        log(f"error: lost another rank {where}: its node died or its network is down; torchrun restarts the "
            "workers from the newest checkpoint where --max-restarts allows", every_rank=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
