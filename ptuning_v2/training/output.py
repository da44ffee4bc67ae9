"""The output directory and the checkpoint to resume: checked before anything is loaded (``plan_output_dir``),
an earlier run moved aside where told to (``OutputPlan``), the run's own checkpoints rotated, and ``start_run``,
which does all of it before a run loads anything."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from ..spellings import BOOLEAN_WORDS
from .settings import (
    RUN_CONFIG,
    PrefixTrainingArguments,
    RunSettings,
    SettingsError,
    check_settings,
    write_run_config,
)

# Entries of an output directory that are not an earlier run: our data cache, and runs moved aside before.
_NOT_A_RUN = re.compile(r"\.data_cache|overwritten-.*|superseded-.*")
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


def checkpoints_in(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder, by step."""
    if not directory.is_dir():
        return []
    found = ((_CHECKPOINT.fullmatch(p.name), p) for p in directory.iterdir() if p.is_dir())
    return sorted((int(match.group(1)), p) for match, p in found if match)


def _listing(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@dataclass
class OutputPlan:
    """What a training run does with its output directory: the checkpoint it resumes, what it moves aside."""

    resume: str | None = None
    move: list[Path] = field(default_factory=list)
    aside_kind: str = ""  # "overwritten" or "superseded"
    why: str = ""

    def carry_out(self, output_dir: Path) -> Path | None:
        if not self.move:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target, n = output_dir / f"{self.aside_kind}-{stamp}", 1
        while target.exists():
            target, n = output_dir / f"{self.aside_kind}-{stamp}-{n}", n + 1
        target.mkdir()
        for path in self.move:
            os.replace(path, target / path.name)
        names = _listing([p.name for p in self.move])
        print(f"note: {self.why}: moved {names} to {target}/ (delete it when no longer needed)", flush=True)
        return target


def resume_setting(value: str | bool | None) -> str | bool | None:
    """``--resume_from_checkpoint``: a path, True for the latest in the output directory, or None."""
    if value is None or isinstance(value, bool):
        return value or None
    word = value.strip().lower()
    if word in ("", "none"):
        return None
    if word == "latest":
        return True
    return BOOLEAN_WORDS.get(word, value) or None


def _learning_rate_at(args: PrefixTrainingArguments, total_steps: int, step: int) -> float | None:
    """The learning rate the run's schedule gives at ``step`` of ``total_steps``; None where that can't be told."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    try:
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=args.get_warmup_steps(total_steps),
            num_training_steps=total_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )
    except (ValueError, TypeError):
        return None
    lambdas = getattr(scheduler, "lr_lambdas", None)  # LambdaLR: every schedule but reduce_lr_on_plateau
    return args.learning_rate * lambdas[0](step) if lambdas else None


def _check_resumed_schedule(args: PrefixTrainingArguments, checkpoint: Path, is_main: bool) -> int:
    """Refuse a resume with nothing left to train; warn when another --max_steps bends the schedule. The step."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step, planned = int(state.get("global_step", 0)), int(state.get("max_steps", 0))
    if args.max_steps <= 0:
        return step
    if step >= args.max_steps:
        raise SettingsError(
            f"--resume_from_checkpoint {checkpoint} is at step {step} and --max_steps is {args.max_steps}: "
            f"nothing is left to train. Raise --max_steps (MAX_STEPS) above {step}"
        )
    if planned <= 0 or planned == args.max_steps:
        return step
    before, after = _learning_rate_at(args, planned, step), _learning_rate_at(args, args.max_steps, step)
    if before is not None and after is not None and math.isclose(before, after, rel_tol=1e-9, abs_tol=0):
        return step  # e.g. a constant schedule: nothing jumps
    jump = f" (from {before:.4g} to {after:.4g})" if before is not None and after is not None else ""
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if is_main:
        print(
            f"warning: {checkpoint} is step {step} of a run planned for --max_steps {planned}, and this run has "
            f"--max_steps {args.max_steps}: the {schedule} learning-rate schedule is recomputed for "
            f"{args.max_steps} steps, so the learning rate jumps at step {step}{jump}. Resume with --max_steps "
            f"{planned} (MAX_STEPS={planned}) to continue the same schedule.",
            file=sys.stderr,
            flush=True,
        )
    return step


def _earlier_run(output_dir: Path) -> list[Path]:
    """What an earlier run left in the output directory: its checkpoints by step, then everything else."""
    if not output_dir.is_dir():
        return []
    checkpoints = [path for _, path in checkpoints_in(output_dir)]
    others = sorted(
        p for p in output_dir.iterdir() if p not in checkpoints and not _NOT_A_RUN.fullmatch(p.name)
    )
    return checkpoints + others


def plan_output_dir(args: PrefixTrainingArguments, is_main: bool = True) -> OutputPlan:
    """Check the output directory and the checkpoint to resume, before anything is loaded; changes nothing.

    A new run needs an output directory without an earlier run in it, or ``--overwrite_output_dir`` (the earlier
    run is moved aside, so its checkpoints cannot be mistaken for this run's). A resumed run continues a
    checkpoint; the checkpoints of its directory past that step belong to the run it branches from, and are
    moved aside with that run's final files.
    """
    output_dir = Path(args.output_dir)
    resume = resume_setting(args.resume_from_checkpoint)
    if not args.do_train:
        return OutputPlan()
    if resume is True:
        resume = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if resume is None:
            raise SettingsError(
                f"--resume_from_checkpoint true: {output_dir} holds no {PREFIX_CHECKPOINT_DIR}-N folder to resume "
                "from; give a checkpoint's path, or leave the flag out to start a new run"
            )
    earlier = _earlier_run(output_dir)
    if resume:
        checkpoint = Path(resume)
        if not checkpoint.is_dir():
            raise SettingsError(f"--resume_from_checkpoint {resume!r}: no such checkpoint directory")
        if not (checkpoint / "trainer_state.json").is_file():
            raise SettingsError(
                f"--resume_from_checkpoint {resume!r} is not a training checkpoint (it has no trainer_state.json); "
                "to start a new run from a trained prefix, give it as --ptuning_checkpoint"
            )
        step = _check_resumed_schedule(args, checkpoint, is_main)
        if checkpoint.resolve().parent == output_dir.resolve():  # continuing the run of this directory
            if not any(n > step for n, _ in checkpoints_in(output_dir)):
                return OutputPlan(resume=str(checkpoint))
            ours = {path for n, path in checkpoints_in(output_dir) if n <= step}
            return OutputPlan(
                resume=str(checkpoint),
                move=[path for path in earlier if path not in ours],
                aside_kind="superseded",
                why=f"resuming {checkpoint.name} (step {step}), which the run in {output_dir} went past",
            )
    if earlier and not args.overwrite_output_dir:
        raise SettingsError(
            f"output directory {output_dir} already holds an earlier run ({_listing([p.name for p in earlier])}). "
            "Continue it with --resume_from_checkpoint true (RESUME=true in scripts/train_pt2.sh), or start over "
            f"with --overwrite_output_dir true (OVERWRITE=true), which first moves it aside to "
            f"{output_dir}/overwritten-<time>/; or choose another --output_dir"
        )
    why = f"--overwrite_output_dir: {output_dir} held an earlier run"
    return OutputPlan(resume=str(resume) if resume else None, move=earlier, aside_kind="overwritten", why=why)


def rotate_run_checkpoints(run_dir: str, limit: int | None, step: int, best: str | None = None) -> None:
    """Keep this run's newest ``limit`` checkpoints (and the best one), deleting older ones.

    transformers' ``rotate_checkpoints`` sorts every ``checkpoint-N`` of the folder by N, so another run's higher
    steps would outlive this run's; here a checkpoint past the current step is never counted nor deleted.
    (``plan_output_dir`` moves such checkpoints aside before a run starts.)
    """
    if not limit or limit <= 0:
        return
    ours = [path for n, path in checkpoints_in(Path(run_dir)) if n <= step]
    keep = set(ours[-limit:]) | ({Path(best)} if best else set())
    for path in ours:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


def start_run(settings: RunSettings) -> OutputPlan:
    """Check every setting, the output directory and the checkpoint to resume, before anything is loaded; then
    move an earlier run aside where told to, and record the settings in the output directory."""
    args = settings.training
    check_settings(settings)
    plan = plan_output_dir(args, args.process_index == 0)
    state = PartialState()
    state.wait_for_everyone()  # every process has read the output directory before it changes
    if args.should_save:
        plan.carry_out(Path(args.output_dir))
        if args.do_train:
            write_run_config(settings, Path(args.output_dir) / RUN_CONFIG)
    state.wait_for_everyone()
    if args.deepspeed and args.world_size > 1:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        # DeepSpeed's comm layer wraps the group accelerate made; ZeRO-3 init reads the world size from it.
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    return plan
