"""The HF Trainer, hooked only where it must be: ``TuningTrainer`` saves what the method trains, writes checkpoints
atomically and stops on a non-finite loss; ``TrainingHealthCallback`` stops a saturated or dead prefix; the
DeepSpeed checkpoint load is made non-strict (applied when this module is imported); ``make_trainer`` puts a run's
Trainer together."""

from __future__ import annotations

import contextlib
import functools
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
import transformers.trainer
from transformers import Trainer, TrainerCallback
from transformers.integrations.deepspeed import deepspeed_load_checkpoint
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .. import nlu
from ..checkpoint import CheckpointError
from ..data import training_collator
from ..files import atomic_directory, atomic_open, swap_directory
from ..methods import read_checkpoint, tuning_of
from ..mixing import MixPlan, write_record
from .output import rotate_run_checkpoints, writing
from .scoring import Datasets, Scorer
from .settings import RunSettings

# ---------------------------------------------------------------- the Trainer, only where hooks demand it


class TrainingStopped(RuntimeError):
    """The run stopped itself because its loss or prefix went bad; nothing broken was saved."""


class NonFiniteError(TrainingStopped):
    """The loss, the prefix or its gradient is inf/nan."""


class SaturatedError(TrainingStopped):
    """The prefix grew past --max_prefix_weight, or its gradient stayed exactly 0: training cannot recover."""


def _stopped(error: type[TrainingStopped], what: str, args: Any) -> TrainingStopped:
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    return error(
        f"{what}; stopping without saving it. Last good checkpoint: {last or 'none yet'}. "
        f"Lower the learning rate (--learning_rate {args.learning_rate:g}) or check the data."
    )


def _trained(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the method trains (looking through DDP/DeepSpeed wrappers)."""
    return tuning_of(model).trainable_parameters()


def _trained_name(model: torch.nn.Module) -> str:
    """How the health messages name what trains, for every method (a prefix, LoRA, the whole model)."""
    return f"the trained weights ({tuning_of(model).name})"


class TrainingHealthCallback(TrainerCallback):
    """Stop a run whose prefix has blown up or no longer learns, naming the step; nothing of it is saved.

    * A prefix weight larger than ``--max_prefix_weight`` (1e4) in magnitude after an optimizer step: the prefix
      has saturated, attention to it is all-or-nothing and its gradient is ~0, so the run cannot recover. In the
      bundled main job (lr 0.1, 700 steps) no prefix weight passes 10 and the gradient norm stays within
      0.034-0.22 at every step; Adam moves each weight by about the learning rate a step, so an absurd learning
      rate (1e4 and up) passes the bound at its first step.
    * A prefix gradient that is exactly 0 for ``--zero_grad_patience`` (10) optimizer steps in a row: the loss no
      longer depends on the prefix. (A non-finite loss or gradient stops at once: ``TuningTrainer.training_step``.)

    Checked on every process alike: gradients are equal across data-parallel processes, and the largest weight
    is reduced across them (ZeRO-3 gives each only a partition). Under DeepSpeed the gradient check is skipped
    (it keeps gradients in its own buffers).
    """

    def __init__(self) -> None:
        self.zero_since: int | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        grads = [p.grad for p in _trained(model) if p.grad is not None]
        if not grads or not args.zero_grad_patience:  # DeepSpeed keeps gradients in its own buffers
            return
        step = state.global_step + 1
        if any(g.count_nonzero() for g in grads):  # after clipping, which keeps a zero gradient zero
            self.zero_since = None
            return
        self.zero_since = self.zero_since or step
        if step - self.zero_since + 1 >= args.zero_grad_patience:
            raise _stopped(
                SaturatedError,
                f"the gradient of {_trained_name(model)} has been exactly 0 since step {self.zero_since} "
                f"({args.zero_grad_patience} optimizer steps in a row, up to step {step}; --zero_grad_patience): "
                "the loss no longer depends on them (most likely saturated)",
                args,
            )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or not args.max_prefix_weight:
            return
        values = [getattr(p, "ds_tensor", p).detach() for p in _trained(model)]
        largest = torch.stack(
            [v.abs().max().float().cpu() if v.numel() else torch.zeros(()) for v in values]
        ).max()
        largest = largest.to(args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        largest = largest.item()
        if not math.isfinite(largest):
            raise _stopped(
                NonFiniteError,
                f"{_trained_name(model)} are no longer finite ({largest}) after step {state.global_step}",
                args,
            )
        if largest > args.max_prefix_weight:
            raise _stopped(
                SaturatedError,
                f"{_trained_name(model)} saturated at step {state.global_step}: a weight of magnitude "
                f"{largest:.3g}, past --max_prefix_weight {args.max_prefix_weight:g} (normal runs stay far below "
                "it), leaves attention all-or-nothing and the gradient ~0",
                args,
            )


class TuningTrainer(Trainer):
    """The HF Trainer, hooked where it must be: it saves what the method trains (``model.tuning``), writes
    checkpoints atomically, and stops on a non-finite loss or trained weights gone bad."""

    def __init__(
        self,
        model: torch.nn.Module,
        head_labels: tuple[str, list[Any]] | None = None,
        mix: MixPlan | None = None,
        **kwargs: Any,
    ) -> None:
        # An NLU head's (task type, labels): every save gets its labels.json, so a checkpoint loads and predicts on
        # its own.
        self.head_labels = head_labels
        # Data mixing (--mix_file): the training set is the task's examples then the mixed ones, which the
        # sampler interleaves at the ratio of every batch.
        self.mix = mix
        # The health checks come first, so that no other callback acts on a step that broke the prefix.
        kwargs["callbacks"] = [TrainingHealthCallback(), *(kwargs.get("callbacks") or [])]
        # The Trainer refuses a quantized model without a PEFT adapter; the method's parameters are our adapter.
        flag = getattr(model, "is_quantized", False) and not getattr(model, "_hf_peft_config_loaded", False)
        if flag:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(model=model, **kwargs)
        finally:
            if flag:
                model._hf_peft_config_loaded = False

    def _get_train_sampler(self, *args: Any, **kwargs: Any) -> Any:
        if self.mix is None:
            return super()._get_train_sampler(*args, **kwargs)
        # Seeded by the run and the epoch alone (not the RNG state), so a resumed run, whose Trainer skips the
        # batches it trained, continues the same mix.
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return self.mix.sampler(self._train_batch_size, seed)

    def _stop(self, what: str) -> None:
        raise _stopped(NonFiniteError, f"{what} at step {self.state.global_step}", self.args)

    def _check_finite_prefix(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        # Under ZeRO-3 each process sees only its partition; the loss check covers what this misses.
        if not all(torch.isfinite(p.detach()).all() for p in _trained(model)):
            self._stop("the trained weights are no longer finite (inf/nan)")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """What the method trains (and an NLU head's labels), every file whole: a failed save leaves no part of it."""
        self._check_finite_prefix()
        output_dir = output_dir or self.args.output_dir
        handle = tuning_of(self.accelerator.unwrap_model(self.model))
        if handle.saves_backbone:  # the whole model: the Trainer's own save gathers ZeRO-3 shards
            with atomic_directory(output_dir, replace=False) as staging:
                super().save_model(str(staging), _internal_call)
            if self.args.should_save:
                handle.write_config(output_dir)  # last: a reader that finds it finds the model whole
        else:
            with _gathered(handle.trainable_parameters(), self.is_deepspeed_enabled):
                if self.args.should_save:
                    handle.save(output_dir)
                    with atomic_open(os.path.join(output_dir, "training_args.bin"), "wb") as f:
                        torch.save(self.args, f)
        if self.head_labels is not None and self.args.should_save:
            nlu.write_labels(output_dir, *self.head_labels)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # DeepSpeed would otherwise write the frozen backbone into every checkpoint.
        engine = self.model_wrapped
        engine.save_checkpoint = functools.partial(engine.save_checkpoint, exclude_frozen_parameters=True)
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del engine.save_checkpoint

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write ``checkpoint-N`` in a staging folder and rename it when complete.

        The Trainer (5.x) writes straight into ``checkpoint-N``, so a save that fails halfway (a full disk, a kill)
        would leave a checkpoint that ``get_last_checkpoint`` picks. Here only whole checkpoints get that name; a
        failed save's staging folder is removed, and a full or read-only disk ends the run with one line
        (``writing``)."""
        self._check_finite_prefix()
        run_dir = self.args.output_dir
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        final, staging_root = os.path.join(run_dir, name), os.path.join(run_dir, ".staging")
        staged = os.path.join(staging_root, name)
        if self.args.should_save:  # a killed run's leftover must not mix into this save
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        with writing(run_dir, f"saving {name}", partial=staging_root, removed=name, files_in=staged):
            self.args.output_dir = staging_root
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self.args.output_dir = run_dir
            if self.mix is not None and self.args.should_save:  # what a resume must continue
                write_record(self.mix, Path(staged))
            best = self.state.best_model_checkpoint  # the Trainer may have named it inside the staging folder
            if best and Path(best).parent == Path(staging_root):
                self.state.best_model_checkpoint = os.path.join(run_dir, Path(best).name)
                if self.args.should_save:
                    self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            self.accelerator.wait_for_everyone()
            if self.args.should_save:
                swap_directory(staged, final)
                shutil.rmtree(staging_root, ignore_errors=True)
        if self.args.should_save:
            rotate_run_checkpoints(
                run_dir, self.args.save_total_limit, self.state.global_step, self.state.best_model_checkpoint
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        handle = tuning_of(self.accelerator.unwrap_model(model or self.model))
        if handle.saves_backbone:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = _read_checkpoint_state(resume_from_checkpoint, handle.name)
        handle.load_state_dict(loaded, resume_from_checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The gradient is checked here, before clipping can hide an inf (it scales everything by max_norm/inf = 0).
        # Under fp16 an inf gradient is the loss scaler's to skip; DeepSpeed keeps gradients in its own buffers.
        # The norm is the one clipping computes: past float32's range it is inf even where every element is finite.
        grads = [p.grad.detach() for p in _trained(model) if p.grad is not None]
        norm = (
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if grads
            else None
        )
        grad_ok = self.args.fp16 or norm is None or bool(torch.isfinite(norm))
        bad = torch.tensor([float(not torch.isfinite(loss).all()), float(not grad_ok)], device=loss.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad)  # every process stops together, or the others would hang
        step = self.state.global_step + 1
        if bad[0] > 0:
            self._stop(f"the loss is {loss.item()} (before the optimizer step {step})")
        if bad[1] > 0:
            shown = "not finite" if norm is None else f"{norm.item()}"
            raise _stopped(NonFiniteError, f"the prefix's gradient norm is {shown} at step {step}", self.args)
        return loss


def _read_checkpoint_state(path: str, method: str) -> dict[str, torch.Tensor]:
    """The tensors a ``checkpoint-N`` folder holds for ``method``, checked against the method's checkpoint format."""
    checkpoint = read_checkpoint(path)
    if checkpoint.method != method:
        raise CheckpointError(f"{path}: a {checkpoint.method} checkpoint, this run trains {method}")
    return checkpoint.state_dict


def _gathered(params: list[torch.nn.Parameter], deepspeed_enabled: bool):
    """ZeRO-3 partitions even the prefix; gather just it (never the backbone) to save."""
    if deepspeed_enabled:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _deepspeed_load_prefix_only(engine, checkpoint_path, load_module_strict=True):
    # Our DeepSpeed checkpoints exclude the frozen backbone, so module loading cannot be strict.
    return deepspeed_load_checkpoint(engine, checkpoint_path, load_module_strict=False)


# Patched when this module is imported (ptuning_v2.train imports it): the Trainer looks the function up in its
# module when it resumes.
transformers.trainer.deepspeed_load_checkpoint = _deepspeed_load_prefix_only


class GenerationEvalCallback(TrainerCallback):
    """Generate and score the validation set every N steps, through the same code as the final evaluation."""

    def __init__(self, every: int, evaluate: Any) -> None:
        self.every, self.evaluate = every, evaluate

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            metrics = self.evaluate(f"step-{state.global_step}")
            state.log_history.append(
                {"step": state.global_step, **{f"gen_{k}": v for k, v in metrics.items()}}
            )


def make_trainer(
    settings: RunSettings,
    model: torch.nn.Module,
    tokenizer: Any,
    datasets: Datasets,
    score: Scorer,
    labels: list[Any] | None = None,
) -> TuningTrainer:
    callbacks: list[TrainerCallback] = []
    every = settings.data.eval_generate_steps
    if every and datasets.eval_generate is not None:
        callbacks.append(GenerationEvalCallback(every, lambda name: score(name, datasets.eval_generate)))
    head = labels is not None  # an NLU head: its own collator and loss (see ptuning_v2.nlu)
    return TuningTrainer(
        model=model,
        args=settings.training,
        train_dataset=datasets.train,
        eval_dataset=datasets.eval_loss,
        data_collator=nlu.collator(tokenizer.pad_token_id) if head else training_collator(tokenizer),
        compute_loss_func=nlu.loss if head else None,
        processing_class=tokenizer,
        callbacks=callbacks,
        head_labels=(settings.data.task_type, labels) if head else None,
        mix=datasets.mix,
    )
