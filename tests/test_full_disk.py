"""A full or read-only disk during training: every write of a run that the file system refuses (the run's
settings, a checkpoint, the final save, the predictions, the loss curve) ends it with one ``error:`` line that
names the file system, what failed, the latest complete checkpoint and how to resume; nothing half-written is left
where a resume would pick it up, and once there is room again the run resumes from that checkpoint.

The disk refuses in two ways: a real small tmpfs that the test mounts (root only; skipped elsewhere), filled up or
remounted read-only in the middle of a checkpoint's save, and a fake disk that works on any machine (``FakeDisk``).
"""

from __future__ import annotations

import builtins
import errno
import io
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_bad_input_train import one_error_line, run, script_settings
from test_train import ner_rows, train_args, write_jsonl
from tiny_models import save_tiny_backbone
from transformers.trainer_utils import get_last_checkpoint

from ptuning_v2.files import intended_path
from ptuning_v2.train import TuningTrainer, cli, main
from ptuning_v2.training.output import refusal, writing

STEPS = 2  # checkpoint-1, checkpoint-2 (the last step), then the final save
RESUME = "rerun with RESUME=true (python -m ptuning_v2.train: --resume_from_checkpoint true)"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("full_disk")
    rows = ner_rows()
    write_jsonl(root / "train.json", rows)
    texts = [r["content"] + r["summary"] for r in rows] + ["正面负面无"]
    save_tiny_backbone(root / "model", texts, initializer_range=0.2)
    return root


def args(workdir: Path, out: Path, *extra: str) -> list[str]:
    return train_args(workdir, out, "--save_steps", "1", *extra, steps=STEPS)


@pytest.fixture(scope="module")
def straight(workdir) -> dict[str, torch.Tensor]:
    """The prefix of a run that no disk stopped."""
    out = workdir / "straight"
    main(args(workdir, out))
    return load_file(out / "prefix_model.safetensors")


def failed(argv: list[str], capsys) -> str:
    """Run the entry point: it must fail with exactly one ``error:`` line, on a line of its own, and no traceback."""
    capsys.readouterr()
    status = cli(argv)
    err = capsys.readouterr().err
    assert status == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), err[-3000:]
    return errors[0]


def half_written(out: Path) -> list[str]:
    """What a failed write could leave behind: the staging folder, temporary files and directories."""
    names = (p for p in out.rglob("*") if ".data_cache" not in p.parts)
    return [str(p) for p in names if p.name == ".staging" or ".tmp-" in p.name or ".old-" in p.name]


def resumed(argv: list[str], monkeypatch) -> list[str]:
    """Run again with RESUME=true; the checkpoints the run loaded."""
    loaded: list[str] = []
    original = TuningTrainer._load_from_checkpoint

    def spy(self, checkpoint, model=None):
        loaded.append(checkpoint)
        return original(self, checkpoint, model)

    monkeypatch.setattr(TuningTrainer, "_load_from_checkpoint", spy)
    assert cli([*argv, "--resume_from_checkpoint", "true"]) == 0
    return loaded


# ---------------------------------------------------------------- a real tmpfs


@pytest.fixture
def disk(tmp_path) -> Path:
    """A 2 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(mount: Path, leave: int) -> Path:
    """Fill the file system until ``leave`` bytes are left; the filler file."""
    status = os.statvfs(mount)
    filler = mount / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * (status.f_bavail * status.f_frsize - leave))
    return filler


# 0 KiB left: safetensors fails ("(os error 28)"); 16 KiB: the first files fit and torch's zip writer fails with the
# issue's "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos" (no error number at all).
@pytest.mark.parametrize("refused", ["full, 0 KiB left", "full, 16 KiB left", "read-only"])
def test_a_real_disk_refusing_a_checkpoint(workdir, straight, disk, refused, capsys, monkeypatch):
    out = disk / "out"
    original = TuningTrainer._save_checkpoint

    def refuse_at_step_2(self, model, trial):
        if self.state.global_step == 2:
            if refused == "read-only":
                subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
            else:
                fill(disk, 1024 * int(refused.split()[1]))
        return original(self, model, trial)

    monkeypatch.setattr(TuningTrainer, "_save_checkpoint", refuse_at_step_2)
    line = failed(args(workdir, out), capsys)
    print(line)  # the message itself, in the test log (pytest -s)
    if refused == "read-only":
        assert (
            f"error: OUTPUT_DIR {out} is on a read-only file system (mounted at {disk}), while saving checkpoint-2"
            in line
        )
        assert f"make {disk} writable and {RESUME} to continue from it" in line
    else:
        assert (
            f"error: no space left on the file system holding OUTPUT_DIR {out} (mounted at {disk}, " in line
            and "while saving checkpoint-2" in line
        )
        assert f"free space on {disk} and {RESUME} to continue from it" in line
    assert f"The latest complete checkpoint is {out / 'checkpoint-1'} (step 1)" in line
    assert not (out / "checkpoint-2").exists() and not half_written(out)
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-1")

    # Make room (or make it writable) and resume: the run continues from checkpoint-1 to the same prefix.
    if refused == "read-only":
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
    else:
        (disk / "filler").unlink()
    monkeypatch.setattr(TuningTrainer, "_save_checkpoint", original)
    assert resumed(args(workdir, out), monkeypatch) == [str(out / "checkpoint-1")]
    prefix = load_file(out / "prefix_model.safetensors")
    assert torch.allclose(prefix["embedding.weight"], straight["embedding.weight"], atol=1e-6, rtol=0)


def test_a_real_disk_full_before_the_first_checkpoint(workdir, disk, capsys):
    out = disk / "out"
    filler = fill(disk, 8 * 1024)  # room for run_config.yaml, not for the tokenized-data cache
    line = failed(args(workdir, out), capsys)
    assert f"OUTPUT_DIR {out} (mounted at {disk}, " in line
    assert "while writing the tokenized-data cache; the partial .data_cache was removed." in line
    assert (
        f"No complete checkpoint yet: free space on {disk} and rerun with OVERWRITE=true (--overwrite_output_dir "
        "true), which moves what this run wrote aside." in line
    )
    assert not (out / ".data_cache").exists()
    filler.unlink()
    assert cli([*args(workdir, out), "--overwrite_output_dir", "true"]) == 0


def test_the_script_on_a_read_only_disk_says_so_in_one_line(workdir, disk):
    subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
    out = disk / "out"
    line = one_error_line(run("scripts/train_pt2.sh", *script_settings(workdir, out)))
    assert line == (
        f"error: OUTPUT_DIR {out} is on a read-only file system (mounted at {disk}), while writing the run's "
        f"settings (run_config.yaml); nothing half-written was left. No complete checkpoint yet: make {disk} "
        f"writable and rerun the same command. (OSError: [Errno 30] Read-only file system: '{out}')"
    )


# ---------------------------------------------------------------- a fake disk, on any machine


class _FillingFile:
    """A file on a full disk: a write stores the first half of its bytes, then fails as a real one does (ENOSPC,
    naming no file)."""

    def __init__(self, f) -> None:
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


class FakeDisk:
    """The file system under ``root``, made to refuse every write from the first one of a file whose path ends
    with ``at`` (a file's own name, not its temporary one) until ``free()``: ``"full"`` (writes fail with ENOSPC
    after taking half their bytes) or ``"read-only"`` (opening for writing fails with EROFS).

    Python's ``open``, ``torch.save`` to a path (it fails as torch's zip writer does: a partial file and a
    RuntimeError without an error number) and ``os.statvfs`` (no space left, or the read-only flag: what the run
    asks when an error carries no number) see the state; safetensors' own writer and ``mkdir`` do not."""

    def __init__(self, monkeypatch, root: Path) -> None:
        self.root, self.at, self.kind, self.refusing = root.resolve(), None, "full", False
        real_open, real_save, real_statvfs = builtins.open, torch.save, os.statvfs

        def here(path) -> Path | None:
            if not isinstance(path, (str, os.PathLike)):
                return None
            path = Path(os.path.abspath(path))
            return path if path.is_relative_to(self.root) else None

        def refuses(path: Path) -> bool:
            if self.at is not None and str(intended_path(path)).endswith(os.sep + self.at):
                self.refusing = True
            return self.refusing

        def fake_open(file, mode="r", *a, **k):
            path = here(file)
            if path is None or not set(mode) & set("wxa+") or not refuses(path):
                return real_open(file, mode, *a, **k)
            if self.kind == "read-only":
                raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(file))
            return _FillingFile(real_open(file, mode, *a, **k))

        def fake_save(obj, f, *a, **k):
            path = here(f)
            if path is None or not refuses(path):
                return real_save(obj, f, *a, **k)
            if self.kind == "read-only":
                raise RuntimeError(f"File {f} cannot be opened.")
            with real_open(f, "wb") as partial:  # the real open: the fake one would fail first
                partial.write(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

        def fake_statvfs(path):
            status = real_statvfs(path)
            if here(path) is None or not self.refusing:
                return status
            values = list(status)
            if self.kind == "read-only":
                values[8] |= os.ST_RDONLY  # f_flag
            else:
                values[3] = values[4] = 0  # f_bfree, f_bavail
            return os.statvfs_result(values)

        for target, name, fake in (
            (builtins, "open", fake_open),
            (io, "open", fake_open),  # pathlib's write_text opens through io.open
            (torch, "save", fake_save),
            (os, "statvfs", fake_statvfs),
        ):
            monkeypatch.setattr(target, name, fake)

    def refuse(self, at: str, kind: str = "full") -> None:
        self.at, self.kind = at, kind

    def free(self) -> None:
        self.at, self.refusing = None, False


@pytest.fixture
def fake_disk(tmp_path, monkeypatch) -> FakeDisk:
    return FakeDisk(monkeypatch, tmp_path)


EVAL = ("--validation_file", "{train}", "--do_eval", "--compare_with_base", "true", "--max_new_tokens", "8")
# (the file whose write the disk refuses, how, extra flags, the step named, the latest checkpoint, what to rerun)
WRITES = {
    "run config": (
        "run_config.yaml",
        "read-only",
        (),
        "writing the run's settings (run_config.yaml); nothing half-written was left",
        "No complete checkpoint yet: make {mount} writable and rerun the same command",
    ),
    "checkpoint": (
        "checkpoint-2/optimizer.pt",
        "full",
        (),
        "saving checkpoint-2; the partial checkpoint-2 was removed",
        "The latest complete checkpoint is {out}/checkpoint-1 (step 1): free space on {mount} and {resume} to "
        "continue from it",
    ),
    "final save": (
        "out/prefix_config.json",
        "full",
        (),
        "writing the final save (the trained weights in OUTPUT_DIR); nothing half-written was left",
        "The latest complete checkpoint is {out}/checkpoint-2, the run's last step (2 of 2): free space on {mount} "
        "and {resume} to finish the run from it (final save, loss curve, scores) without training again",
    ),
    "loss curve": (
        "loss_curve.png",
        "read-only",
        (),
        "plotting the loss curve (loss_curve.png); nothing half-written was left",
        "The latest complete checkpoint is {out}/checkpoint-2, the run's last step (2 of 2): make {mount} writable "
        "and {resume} to finish the run from it",
    ),
    "predictions": (
        "generated_predictions.txt",
        "full",
        EVAL,
        "writing the predictions and scores of the validation set (before/generated_predictions.txt); nothing "
        "half-written was left",
        "The latest complete checkpoint is {out}/checkpoint-2, the run's last step (2 of 2): free space on {mount} "
        "and {resume} to finish the run from it",
    ),
}


@pytest.mark.parametrize("write", list(WRITES))
def test_a_refused_write_says_what_failed_and_resumes(
    workdir, fake_disk, tmp_path, write, capsys, monkeypatch
):
    at, kind, extra, doing, go_on = WRITES[write]
    out = tmp_path / "out"
    argv = args(workdir, out, *(e.format(train=workdir / "train.json") for e in extra))
    mount = tmp_path.resolve()
    while not os.path.ismount(mount):
        mount = mount.parent
    fake_disk.refuse(at, kind)
    line = failed(argv, capsys)
    problem = (
        f"OUTPUT_DIR {out} is on a read-only file system (mounted at {mount})"
        if kind == "read-only"
        else f"no space left on the file system holding OUTPUT_DIR {out} (mounted at {mount}, 0 B free)"
    )
    assert line.startswith(f"error: {problem}, while {doing}. "), line
    assert go_on.format(out=out, mount=mount, resume=RESUME) in line, line
    assert not half_written(out)
    if write == "checkpoint":
        assert not (out / "checkpoint-2").exists() and get_last_checkpoint(str(out)) == str(
            out / "checkpoint-1"
        )
    if write == "final save":
        assert not (out / "prefix_model.safetensors").exists()  # no half of the final save either

    fake_disk.free()
    if write == "run config":  # nothing to resume: the same command again
        assert cli(argv) == 0
        return
    checkpoint = get_last_checkpoint(str(out))
    assert resumed(argv, monkeypatch) == [checkpoint]
    assert {"run_config.yaml", "prefix_model.safetensors", "loss_curve.png", "all_results.json"} <= {
        p.name for p in out.iterdir()
    }
    if extra:
        assert (out / "generated_predictions.txt").is_file() and (out / "eval_table.md").is_file()


# ---------------------------------------------------------------- what counts as the file system's refusal


def test_refusal_tells_the_file_systems_errors_from_others(tmp_path):
    assert refusal(OSError(errno.ENOSPC, "No space left on device"), tmp_path) == "full"
    assert refusal(OSError(errno.EROFS, "Read-only file system"), tmp_path) == "read-only"
    rust = Exception("Error while serializing: I/O error: No space left on device (os error 28)")
    assert refusal(rust, tmp_path) == "full"
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert refusal(wrapped, tmp_path) == "full"
    # Permission denied is the output directory's only when it names a file there.
    assert refusal(PermissionError(errno.EACCES, "denied", str(tmp_path / "x")), tmp_path) == "not writable"
    assert refusal(PermissionError(errno.EACCES, "denied", "/elsewhere/data.json"), tmp_path) is None
    # No error number and room on the disk: not the disk's doing.
    assert (
        refusal(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), tmp_path)
        is None
    )
    assert refusal(RuntimeError("the loss is nan"), tmp_path) is None
    assert refusal(ValueError("bad value"), tmp_path) is None


def test_other_failures_pass_through_writing_but_leave_nothing_half_written(tmp_path):
    partial = tmp_path / ".staging"
    with pytest.raises(ValueError, match="^not the disk$"), writing(tmp_path, "saving", partial=partial):
        partial.mkdir()
        (partial / "half").write_text("x")
        raise ValueError("not the disk")
    assert not partial.exists()
