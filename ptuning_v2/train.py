"""Train a prefix (P-Tuning v2 or Prefix-Tuning) over a frozen backbone with the HF Trainer.

    python -m ptuning_v2.train --model_name_or_path models/glm-zh-tiny --train_file data/ner/train.json \\
        --validation_file data/ner/dev.json --pre_seq_len 32 --output_dir output/ner --do_train --do_eval

Argument names follow THUDM's ChatGLM ``ptuning/main.py``; every ``Seq2SeqTrainingArguments`` flag works too
(``--deepspeed``, ``--gradient_checkpointing``, ``--resume_from_checkpoint``, ...). A single ``.json`` or ``.yaml``
file may replace the flags. Flow: data -> tokenize -> Trainer(prefix model) -> prefix checkpoint -> evaluate.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
import transformers.trainer
import yaml
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, Trainer, TrainerCallback, set_seed
from transformers.integrations.deepspeed import deepspeed_load_checkpoint
from transformers.trainer_utils import get_last_checkpoint, rotate_checkpoints

from .attach import attach_prefix, count_parameters, prefix_disabled
from .checkpoint import load_prefix, load_prefix_checkpoint, load_prefix_weights
from .data import (
    DataConfig,
    load_conversations,
    tokenize_for_generation,
    tokenize_for_training,
    training_collator,
)
from .generation import GenerationSettings, evaluate_dataset
from .loading import load_model, load_tokenizer
from .prefix_encoder import PrefixConfig

logger = logging.getLogger("ptuning_v2.train")
METHODS = ("ptuning_v2", "prefix_tuning")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="models/glm-zh-tiny", metadata={"help": "backbone directory"})
    ptuning_checkpoint: str | None = field(
        default=None, metadata={"help": "prefix to start from (any format)"}
    )
    method: str = field(
        default="ptuning_v2", metadata={"help": "ptuning_v2 (deep prompt) or prefix_tuning (MLP)"}
    )
    pre_seq_len: int = 128
    prefix_projection: bool = False
    prefix_hidden_size: int | None = None
    prefix_dropout: float = 0.1
    position_convention: str = field(
        default="chatglm", metadata={"help": "chatglm (from 0) or peft (from P)"}
    )
    quantization_bit: str | None = field(default=None, metadata={"help": "4 (nf4), 8, or none"})
    torch_dtype: str | None = field(default=None, metadata={"help": "fp32, bf16, fp16; default fp32 on CPU"})


@dataclass
class DataArguments(DataConfig):
    """The data settings of ``DataConfig`` (columns, lengths, source prefix) plus the run's data options."""

    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_predict_samples: int | None = None
    task: str = field(default="auto", metadata={"help": "ner, sentiment, none or auto (from the labels)"})
    max_new_tokens: int = 128
    do_sample: bool = False
    top_p: float = 0.7
    temperature: float = 0.95
    eval_generate_steps: int = field(
        default=0, metadata={"help": "also generate+score every N steps (0: off)"}
    )
    compare_with_base: bool = field(default=False, metadata={"help": "score the backbone without prefix too"})


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, Seq2SeqTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, Seq2SeqTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    # Without CUDA, accelerate sees a torchrun/DeepSpeed job as one process unless told it runs on CPU.
    cpu_only = not torch.cuda.is_available()
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        text = Path(argv[0]).read_text()
        settings = json.loads(text) if argv[0].endswith(".json") else yaml.safe_load(text)
        if not isinstance(settings, dict):
            raise ValueError(f"{argv[0]}: expected a mapping of argument names to values")
        if cpu_only:
            settings.setdefault("use_cpu", True)
        return parser.parse_dict(settings)
    if cpu_only and "--use_cpu" not in argv:
        argv += ["--use_cpu", "true"]
    return parser.parse_args_into_dataclasses(args=argv)


def prefix_config(args: ModelArguments) -> PrefixConfig:
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r} is not one of {METHODS}")
    return PrefixConfig(
        pre_seq_len=args.pre_seq_len,
        prefix_projection=args.prefix_projection or args.method == "prefix_tuning",
        prefix_hidden_size=args.prefix_hidden_size,
        prefix_dropout=args.prefix_dropout,
        position_convention=args.position_convention,
    )


def build_model(args: ModelArguments) -> torch.nn.Module:
    """Frozen backbone + prefix: fresh, or warm-started from ``--ptuning_checkpoint``."""
    model = load_model(
        args.model_name_or_path, quantization_bit=args.quantization_bit, torch_dtype=args.torch_dtype
    )
    if args.ptuning_checkpoint:
        load_prefix(model, args.ptuning_checkpoint)
    else:
        attach_prefix(model, prefix_config(args))
    model.train()
    return model


# ---------------------------------------------------------------- the Trainer, only where hooks demand it


class NonFiniteError(RuntimeError):
    pass


class PrefixTrainer(Trainer):
    """Saves only the prefix, writes checkpoints atomically, and stops on a non-finite loss or prefix."""

    def __init__(self, model: torch.nn.Module, **kwargs: Any) -> None:
        # The Trainer refuses a quantized model without a PEFT adapter; the prefix is our trainable adapter.
        flag = getattr(model, "is_quantized", False) and not getattr(model, "_hf_peft_config_loaded", False)
        if flag:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(model=model, **kwargs)
        finally:
            if flag:
                model._hf_peft_config_loaded = False

    def _stop(self, what: str) -> None:
        last = get_last_checkpoint(self.args.output_dir)
        raise NonFiniteError(
            f"{what} at step {self.state.global_step}; stopping without saving it. "
            f"Last good checkpoint: {last or 'none yet'}. Lower the learning rate or check the data."
        )

    def _check_finite_prefix(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        # Under ZeRO-3 each process sees only its partition; the loss check covers what this misses.
        if not all(torch.isfinite(p.detach()).all() for p in model.prefix_encoder.parameters()):
            self._stop("the prefix weights are no longer finite (inf/nan)")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._check_finite_prefix()
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        params = list(model.prefix_encoder.parameters())
        with _gathered(params, self.is_deepspeed_enabled):
            if self.args.should_save:
                model.save_prefix(output_dir)
                torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

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
        """Write ``checkpoint-N`` in a staging folder and rename it when complete."""
        self._check_finite_prefix()
        run_dir = self.args.output_dir
        final = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        staging_root = os.path.join(run_dir, ".staging")
        self.args.output_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging_root, f"checkpoint-{self.state.global_step}"), final)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        load_prefix_weights(model, load_prefix_checkpoint(resume_from_checkpoint))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        bad = torch.tensor(0.0 if torch.isfinite(loss).all() else 1.0, device=loss.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad)  # every process stops together, or the others would hang
        if bad.item() > 0:
            self._stop(f"the loss is {loss.item()} (before the optimizer step {self.state.global_step + 1})")
        return loss


def _gathered(params: list[torch.nn.Parameter], deepspeed_enabled: bool):
    """ZeRO-3 partitions even the prefix; gather just it (never the backbone) to save."""
    if deepspeed_enabled:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _deepspeed_load_prefix_only(engine, checkpoint_path, load_module_strict=True):
    # Our DeepSpeed checkpoints exclude the frozen backbone, so module loading cannot be strict.
    return deepspeed_load_checkpoint(engine, checkpoint_path, load_module_strict=False)


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


# ---------------------------------------------------------------- reporting


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    steps = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in steps], [v for _, v in steps], label="train loss")
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def comparison_table(before: dict[str, Any] | None, after: dict[str, Any]) -> str:
    keys = [k for k in after if k != "speed"]
    if before is None:
        rows = [f"| {k} | {after[k]:.2f} |" for k in keys]
        return "\n".join(["| metric | score |", "|---|---:|", *rows])
    rows = [f"| {k} | {before[k]:.2f} | {after[k]:.2f} | {after[k] - before[k]:+.2f} |" for k in keys]
    return "\n".join(
        ["| metric | before (no prefix) | after (prefix) | change |", "|---|---:|---:|---:|", *rows]
    )


# ---------------------------------------------------------------- main


def _limit(dataset, n: int | None):
    return dataset.select(range(min(n, len(dataset)))) if n else dataset


def _resume_arg(value: str | None) -> str | bool | None:
    if value in (None, "", "false", "False", "none"):
        return None
    return True if value in ("true", "True", "latest") else value


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    # Starts the process group now: ZeRO-3 partitions weights inside from_pretrained and needs it.
    world_size = training_args.world_size
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    is_main = training_args.process_index == 0
    logger.info("processes: %d, device: %s", world_size, training_args.device)
    if training_args.deepspeed and world_size > 1:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        # DeepSpeed's comm layer wraps the group accelerate made; ZeRO-3 init reads the world size from it.
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    if training_args.do_train and not data_args.train_file:
        raise ValueError("--do_train needs --train_file")
    if (training_args.do_eval or data_args.eval_generate_steps) and not data_args.validation_file:
        raise ValueError("--do_eval and --eval_generate_steps need --validation_file")

    tokenizer = load_tokenizer(model_args.model_name_or_path)
    model = build_model(model_args)
    trainable, total = count_parameters(model)
    print(f"trainable {trainable:,} / total {total:,} ({100 * trainable / total:.4f}%)", flush=True)

    data_config = DataConfig(**{f.name: getattr(data_args, f.name) for f in fields(DataConfig)})
    cache_dir = str(output_dir / ".data_cache")

    def tokenized(path: str, limit: int | None, for_generation: bool):
        raw = _limit(load_conversations(path, data_config, cache_dir=cache_dir), limit)
        if for_generation:
            return tokenize_for_generation(raw, tokenizer, data_config)
        dataset, stats = tokenize_for_training(raw, tokenizer, data_config)
        print(f"{path}: {stats.summary()}", flush=True)
        return dataset

    with training_args.main_process_first(desc="tokenize"):
        train_set = (
            tokenized(data_args.train_file, data_args.max_train_samples, False)
            if training_args.do_train
            else None
        )
        eval_loss_set = None
        if data_args.validation_file and training_args.eval_strategy != "no":
            eval_loss_set = tokenized(data_args.validation_file, data_args.max_eval_samples, False)
        eval_gen_set = None
        if data_args.validation_file and (training_args.do_eval or data_args.eval_generate_steps):
            eval_gen_set = tokenized(data_args.validation_file, data_args.max_eval_samples, True)
        test_set = None
        if training_args.do_predict:
            if not data_args.test_file:
                raise ValueError("--do_predict needs --test_file")
            test_set = tokenized(data_args.test_file, data_args.max_predict_samples, True)

    settings = GenerationSettings(
        batch_size=training_args.per_device_eval_batch_size,
        max_new_tokens=data_args.max_new_tokens,
        do_sample=data_args.do_sample,
        top_p=data_args.top_p,
        temperature=data_args.temperature,
        num_beams=training_args.generation_num_beams or 1,
        seed=training_args.seed,
    )
    task = None if data_args.task == "none" else data_args.task

    def evaluate_generation(
        name: str, dataset, file_name: str = "generated_predictions.txt"
    ) -> dict[str, Any]:
        target = output_dir / name / file_name if name else output_dir / file_name
        metrics = evaluate_dataset(
            model, tokenizer, dataset, settings, target if is_main else None, task=task, progress=is_main
        )
        if is_main:
            print(f"[{name or 'eval'}] " + json.dumps(metrics, ensure_ascii=False), flush=True)
        return metrics

    callbacks = []
    if data_args.eval_generate_steps and eval_gen_set is not None:
        callbacks.append(
            GenerationEvalCallback(
                data_args.eval_generate_steps, lambda n: evaluate_generation(n, eval_gen_set)
            )
        )
    trainer = PrefixTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_loss_set,
        data_collator=training_collator(tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )

    results: dict[str, Any] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=_resume_arg(training_args.resume_from_checkpoint))
        trainer.save_model()
        results["train"] = train_result.metrics
        if is_main:
            curve = plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
            print(f"prefix saved to {output_dir}; loss curve: {curve}", flush=True)
    if training_args.do_eval and eval_gen_set is not None:
        before = None
        if data_args.compare_with_base:
            with prefix_disabled(model):
                before = evaluate_generation("before", eval_gen_set)
        after = evaluate_generation("", eval_gen_set)
        results["eval"] = {"before": before, "after": after}
        if is_main:
            table = comparison_table(before, after)
            print(
                f"\nvalidation ({len(eval_gen_set)} examples, {data_args.validation_file}):\n{table}\n",
                flush=True,
            )
            (output_dir / "eval_table.md").write_text(table + "\n")
    if test_set is not None:
        results["predict"] = evaluate_generation("predict", test_set)
    if is_main:
        (output_dir / "all_results.json").write_text(
            json.dumps(results, indent=2, ensure_ascii=False, default=str)
        )
    return results


if __name__ == "__main__":
    try:
        main()
    except (NonFiniteError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
