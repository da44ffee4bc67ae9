"""The output directory and the checkpoint to resume: checked before anything is loaded (``plan_output_dir``),
an earlier run moved aside where told to (``OutputPlan``), the run's own checkpoints rotated, ``start_run``,
which does all of it before a run loads anything, and ``writing``: a write that the file system refuses (full,
read-only, not writable) ends the run with one line that says what failed and how to go on."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import get_scheduler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .. import mixing
from ..files import intended_path
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
    """Refuse a resume past --max_steps; warn when another --max_steps bends the schedule. The step.

    A resume at exactly --max_steps trains nothing and finishes the run from the checkpoint (final save, loss
    curve, scores): what a run needs whose disk filled up after its last checkpoint."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step, planned = int(state.get("global_step", 0)), int(state.get("max_steps", 0))
    if args.max_steps <= 0:
        return step
    if step > args.max_steps:
        raise SettingsError(
            f"--resume_from_checkpoint {checkpoint} is at step {step} and --max_steps is {args.max_steps}: "
            f"nothing is left to train. Raise --max_steps (MAX_STEPS) above {step}"
        )
    if step == args.max_steps:
        if is_main:
            print(
                f"note: {checkpoint} is at step {step}, the run's last (--max_steps {args.max_steps}): nothing is "
                "trained, the run is finished from it (final save, loss curve, scores)",
                flush=True,
            )
        return step
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
    if plan.resume:
        problem = mixing.resume_problem(plan.resume, settings.data.mix_files(), settings.data.mix_ratio)
        if problem:
            raise SettingsError(problem)
    state = PartialState()
    state.wait_for_everyone()  # every process has read the output directory before it changes
    if args.should_save:
        with writing(args.output_dir, "moving the earlier run aside"):
            plan.carry_out(Path(args.output_dir))
        if args.do_train:
            with writing(args.output_dir, f"writing the run's settings ({RUN_CONFIG})"):
                write_run_config(settings, Path(args.output_dir) / RUN_CONFIG)
    state.wait_for_everyone()
    if args.deepspeed and args.world_size > 1:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        # DeepSpeed's comm layer wraps the group accelerate made; ZeRO-3 init reads the world size from it.
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    return plan


# ---------------------------------------------------------------- a write the file system refuses


class OutputWriteError(OSError):
    """A write of the run failed because the file system holding the output directory is full, read-only or not
    writable. The message is the whole story in one line: the file system, what failed to be written, the latest
    complete checkpoint and how to go on; what the failed write left half-written is gone."""


_REFUSALS = {
    errno.ENOSPC: "full",
    errno.EDQUOT: "full",
    errno.EROFS: "read-only",
    errno.EACCES: "not writable",
    errno.EPERM: "not writable",
}
# Writers outside Python keep the error number only in their message: safetensors (Rust) says "(os error 28)".
_ERROR_NUMBER = re.compile(r"\[Errno (\d+)\]|\(os error (\d+)\)")
# torch's zip writer loses the number entirely: "[enforce fail at inline_container.cc:672] . unexpected pos 3584
# vs 3472", or "PytorchStreamWriter failed writing file", or "File ... cannot be opened."
_NUMBERLESS_WRITE_FAILURE = re.compile(r"inline_container|PytorchStreamWriter|cannot be opened")
# Less than this left counts as full: a write that ran out fills the file system to its last block first.
_NEARLY_FULL = 1 << 20


def _causes(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _existing(path: Path) -> Path:
    """``path``, or its nearest parent that exists (a run may fail before it made its output directory)."""
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _mount_point(path: Path) -> Path:
    path = _existing(path).resolve()
    while not os.path.ismount(path):
        path = path.parent
    return path


def _denied_here(cause: BaseException, directory: Path) -> bool:
    """A permission error is the output directory's if it names a file there, or the directory is not writable."""
    name = getattr(cause, "filename", None)
    if isinstance(name, (str, os.PathLike)):
        path = Path(os.path.abspath(name))
        return path.is_relative_to(directory) or path.is_relative_to(directory.resolve())
    return not os.access(directory, os.W_OK)


def refusal(err: BaseException, directory: str | os.PathLike) -> str | None:
    """Why the file system refused a write into ``directory`` that raised ``err``: ``"full"``, ``"read-only"``,
    ``"not writable"``, or None when the failure is not the file system's."""
    where = _existing(Path(directory))
    for cause in _causes(err):
        number = cause.errno if isinstance(cause, OSError) else None
        if number is None and (match := _ERROR_NUMBER.search(str(cause))):
            number = int(match.group(1) or match.group(2))
        if _REFUSALS.get(number) == "not writable" and not _denied_here(cause, where):
            return None  # e.g. a data file this user may not read
        if number in _REFUSALS:
            return _REFUSALS[number]
    if not (isinstance(err, OSError) or _NUMBERLESS_WRITE_FAILURE.search(str(err))):
        return None  # not a write failure at all: a bad loss, a bug
    # Without an error number, ask the file system what it is now.
    status = os.statvfs(where)
    if status.f_flag & os.ST_RDONLY:
        return "read-only"
    if status.f_bavail * status.f_frsize < _NEARLY_FULL:
        return "full"
    if not os.access(where, os.W_OK):
        return "not writable"
    return None


def _failed_file(err: BaseException, within: Path, output_dir: Path) -> str | None:
    """The file whose write failed, as the run would have named it (not by its temporary name), where the error
    says: relative to ``within`` (a checkpoint being staged) or else to ``output_dir``; None where it is a
    directory made to hold them (the staging folder, the output directory itself)."""
    for cause in _causes(err):
        name = getattr(cause, "filename", None)
        if isinstance(name, (str, os.PathLike)):
            path = intended_path(os.path.abspath(name))
            for base in (within.absolute(), output_dir.absolute()):
                if base.is_relative_to(path):
                    return None
                if path.is_relative_to(base):
                    return str(path.relative_to(base))
            return str(path)
    return None


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    scaled, unit = next((n / 1024**k, u) for k, u in ((3, "GiB"), (2, "MiB"), (1, "KiB")) if n >= 1024**k)
    return f"{scaled:.1f} {unit}"


def latest_checkpoint(output_dir: Path) -> tuple[Path, int, int] | None:
    """The newest complete ``checkpoint-N`` of the directory: ``(path, step, the run's --max_steps)``, or None.

    Checkpoints are renamed into place only when whole (``TuningTrainer._save_checkpoint``), so the newest with a
    readable ``trainer_state.json`` is complete."""
    for _, path in reversed(checkpoints_in(output_dir)):
        try:
            state = json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return path, int(state.get("global_step", 0)), int(state.get("max_steps", 0))
    return None


def write_failure(
    kind: str, output_dir: Path, doing: str, removed: str | None, err: BaseException, free: int
) -> str:
    """The one line that says what a refused write did and how to go on (``kind``: as ``refusal`` says; ``free``:
    the bytes left when the write failed)."""
    mount = _mount_point(output_dir)
    if kind == "full":
        problem = (
            f"no space left on the file system holding OUTPUT_DIR {output_dir} (mounted at {mount}, "
            f"{_size(free)} free)"
        )
        fix = f"free space on {mount}"
    elif kind == "read-only":
        problem = f"OUTPUT_DIR {output_dir} is on a read-only file system (mounted at {mount})"
        fix = f"make {mount} writable"
    else:
        problem = f"OUTPUT_DIR {output_dir} is not writable (permission denied)"
        fix = f"make {output_dir} writable for this user"
    cleaned = f"the partial {removed} was removed" if removed else "nothing half-written was left"
    resume = "rerun with RESUME=true (python -m ptuning_v2.train: --resume_from_checkpoint true)"
    latest = latest_checkpoint(output_dir)
    if latest is None:
        again = (
            "rerun with OVERWRITE=true (--overwrite_output_dir true), which moves what this run wrote aside"
            if _earlier_run(output_dir)
            else "rerun the same command"
        )
        go_on = f"No complete checkpoint yet: {fix} and {again}"
    else:
        path, step, planned = latest
        if planned and step >= planned:
            go_on = (
                f"The latest complete checkpoint is {path}, the run's last step ({step} of {planned}): {fix} "
                f"and {resume} to finish the run from it (final save, loss curve, scores) without training again"
            )
        else:
            go_on = f"The latest complete checkpoint is {path} (step {step}): {fix} and {resume} to continue from it"
    raised = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{problem}, while {doing}; {cleaned}. {go_on}. ({type(err).__name__}: {raised})"


@contextmanager
def writing(
    output_dir: str | os.PathLike,
    doing: str,
    partial: str | os.PathLike | None = None,
    removed: str | None = None,
    files_in: str | os.PathLike | None = None,
) -> Iterator[None]:
    """Run a step that writes into ``output_dir``. If it fails, ``partial`` (what the step may have left
    half-written) is removed; if the failure is the file system's (full, read-only, not writable), it becomes one
    ``OutputWriteError`` naming it, ``doing`` (with the file, where known: relative to ``files_in``, by default
    ``output_dir``), the latest complete checkpoint and how to resume. ``removed`` names ``partial`` in that
    message. A failure already explained passes through."""
    output_dir = Path(output_dir)
    try:
        yield
    except OutputWriteError:
        raise
    except Exception as err:
        kind = refusal(err, output_dir)  # before the removal frees space
        free = shutil.disk_usage(_existing(output_dir)).free
        left = partial is not None and os.path.lexists(partial)
        if left:
            shutil.rmtree(partial, ignore_errors=True)
        if kind is None:
            raise
        file = _failed_file(err, Path(files_in or output_dir), output_dir)
        doing = f"{doing} ({file})" if file and file not in doing else doing
        message = write_failure(kind, output_dir, doing, removed if left else None, err, free)
        raise OutputWriteError(message) from err
