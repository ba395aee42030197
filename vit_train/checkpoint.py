"""Checkpoints: one file holds all a run needs to continue exactly, and loading it can never run code.

A checkpoint is a dict of tensors and plain Python values, saved with `torch.save` and read back with
`torch.load(weights_only=True)`, which refuses anything else. What it holds is the run state's state_dict(): its
layout is in vit_train/state.py, the one place that writes and reads it for training.

Writes are atomic (temporary file, fsync, rename), so a crash mid-save leaves the previous file intact.
"""
import contextlib
import fcntl
import itertools
import os
import pickle
import random
import re
import secrets
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from vit_train.errors import UserError, first_line, warn

REQUIRED_KEYS = ("model", "optimizer", "step", "config")
ZIP_WRITER_FAILURE = re.compile(r"inline_container|PytorchStreamWriter")


def checkpoint_path(path) -> Path:
    """A run directory means its last.pt."""
    path = Path(path)
    return path / "last.pt" if path.is_dir() else path


def save_checkpoint(state: dict, path) -> None:
    """Write `state` to `path` atomically: the file is either the old one or the complete new one."""
    write_atomically(path, lambda f: torch.save(state, f), what="checkpoint")


def write_atomically(path, write, what="file") -> None:
    """Call write(binary file) on a temporary file beside `path`, make it durable, then rename it to `path`:
    readers see the old file or the complete new one. A failed write (a full disk, a missing folder) leaves no
    temporary file and the old file as it was, and is reported in one line as a UserError."""
    path = Path(path)
    # A name of this write's own (created exclusively, so with the umask's permissions): two processes writing one
    # path at once each fill their own file, and the last rename wins with a complete one.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as error:
        if isinstance(error, OSError):
            why = error.strerror or str(error)
        elif ZIP_WRITER_FAILURE.search(str(error)):
            # torch's zip writer reports a failed write (a full disk) without its cause, as a RuntimeError:
            # "[enforce fail at inline_container.cc:...] unexpected pos ..." or "PytorchStreamWriter failed ...".
            # The free space, measured while the partial file still fills the disk, says whether it was that.
            free_mib = shutil.disk_usage(path.parent).free / 2**20
            why = f"torch's writer failed: {first_line(error).split('] ')[-1].strip(' .')}; {free_mib:.1f} MiB free"
        else:
            raise
        kept = f"{path} still holds the previous {what}" if path.exists() else f"no {what} was written"
        raise UserError(f"could not write {path} ({why}); {kept}. Free space or choose another path") from None
    finally:
        tmp.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)  # make the rename itself durable
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


LOCK_FILE = ".lock"
# What a run leaves in its folder (and TensorBoard's events.out.tfevents.* files): a folder holding any of them is
# another run's, continued with --resume, never started over.
RUN_FILES = ("last.pt", "best.pt", "config.json", "metrics.jsonl")


@contextlib.contextmanager
def owned_folder(folder, resuming: bool):
    """Create `folder` and hold it for this process for the block: a second process that asks for it gets a
    one-line UserError rather than writing into it too. The hold is an flock on folder/.lock, which the system
    lets go when the process ends however it ends, so a crash never leaves the folder stuck. A run claims its
    folder before any heavy work, so the folder (and any parent made for it) is removed again when the block ends
    with nothing written there: a run refused while it builds leaves no empty folder behind."""
    folder = Path(folder)
    while True:
        made = list(itertools.takewhile(lambda p: not p.exists(), (folder, *folder.absolute().parents)))
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / LOCK_FILE, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process holds it
            lock.seek(0)
            holder = lock.read().strip()
            lock.close()
            raise in_use(folder, holder, resuming) from None
        except OSError as error:  # a filesystem without locks (some network mounts): nothing can be held
            warn(f"cannot lock {folder} ({error.strerror or error}): its filesystem has no flock, so nothing stops "
                 "another vit-train process from writing into this run folder too; the run goes on")
            break
        if holds_the_lock_file(lock, folder):
            break
        # The run that held it let the folder go (below) between our open and our lock, and removed the file we
        # locked: a lock on it holds nothing, so claim the folder again.
        lock.close()
    try:
        check_no_other_run(folder, resuming)  # again: a run may have ended there while this one was starting
        lock.truncate(0)
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        yield folder
    finally:
        if made and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
            (folder / LOCK_FILE).unlink()
            for directory in made:  # innermost first; one another process has written in since stays
                with contextlib.suppress(OSError):
                    directory.rmdir()
        lock.close()


def holds_the_lock_file(lock, folder) -> bool:
    """Whether the open file `lock` is still the folder's lock file, not one unlinked since it was opened."""
    try:
        return os.path.samestat(os.fstat(lock.fileno()), os.stat(Path(folder) / LOCK_FILE))
    except FileNotFoundError:
        return False


def check_no_other_run(folder, resuming: bool):
    """A folder that holds a run's files is continued with --resume, never started over (RUN_FILES)."""
    folder = Path(folder)
    found = [name for name in RUN_FILES if (folder / name).exists()]
    found += ["TensorBoard events"] if any(folder.glob("events.out.tfevents.*")) else []
    if resuming or not found:
        return
    if "last.pt" in found:
        how = f"continue it with --resume {folder}"
    elif "best.pt" in found:
        how = f"continue it from its best checkpoint with --resume {folder / 'best.pt'}"
    else:  # stopped before its first checkpoint: nothing to continue
        how = "remove the folder to start it over"
    raise UserError(f"{folder} already holds a run ({', '.join(found)}); {how}, or choose another --name")


def check_not_in_use(folder, resuming: bool):
    """Refuse a folder another process holds (owned_folder), before anything starts."""
    try:
        lock = open(Path(folder) / LOCK_FILE)
    except OSError:
        return  # no lock file: never held, or nothing to read
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raise in_use(folder, lock.read().strip(), resuming) from None
        except OSError:
            pass  # a filesystem without locks: nothing is held there (owned_folder warns)


def in_use(folder, holder: str, resuming: bool) -> UserError:
    """The refusal of a folder whose lock another process holds; `holder` is what it wrote there, its pid, or ''
    where the holder is too new to have written it or the file is unreadable."""
    known = holder.isdigit()
    process = f"another vit-train process (pid {holder})" if known else "another vit-train process"
    if resuming:
        stop = f"Ctrl-C there, or kill -INT {holder}" if known else "Ctrl-C there"
        return UserError(f"{folder} is still being trained by {process}; wait for it to end, or stop it ({stop}: "
                         "it saves last.pt) and resume then")
    return UserError(f"{folder} is in use by {process}; wait for it to end, or choose another --name")


def folder_write_error(folder) -> Optional[str]:
    """Why no file can be created in the existing folder `folder`, or None when one can. It really creates one,
    unnamed and gone when closed: os.access says yes to root everywhere, even on /proc or a read-only mount."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as error:
        return error.strerror or str(error)


def folder_creation_error(folder: Path) -> Optional[str]:
    """Why `folder`, which may not exist yet, cannot be made and written in, or None when it can: the nearest
    path above it that exists must be a folder we can write in."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if why := folder_write_error(existing):
        return f"{existing} is not writable ({why})"
    return None


def check_writable(path):
    """Fail before any work is done when `path` cannot be written: its folder is missing or read-only, or it is a
    folder itself."""
    folder = Path(path).absolute().parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: the folder {folder} does not exist; create it or choose another path")
    if Path(path).is_dir():
        raise UserError(f"cannot write {path}: it is a folder; give a file name")
    if why := folder_write_error(folder):
        raise UserError(f"cannot write {path}: the folder {folder} is not writable ({why}); choose another path")


def load_checkpoint(path) -> dict:
    """The checkpoint at `path` (a file, or a run directory for its last.pt), tensors on the CPU.

    Memory-mapped, so reading only the config of a large checkpoint is cheap. A file that is missing, is not a
    vit-train checkpoint, or holds pickled Python objects (which could run code when loaded) is a UserError.
    """
    path = checkpoint_path(path)
    if not path.is_file():
        raise UserError(f"no checkpoint at {path}; give a run directory or its last.pt / best.pt")
    if not zipfile.is_zipfile(path):
        raise UserError(f"{path} is not a vit-train checkpoint (not a file written by torch.save)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        found = re.search(r"GLOBAL (\S+)", str(error))
        what = f" ({found.group(1)})" if found else ""
        raise UserError(f"refusing {path}: it holds a pickled Python object{what}, which could run code when "
                        "loaded; vit-train checkpoints hold only tensors and plain values") from None
    except (RuntimeError, EOFError, KeyError, ValueError, OSError) as error:
        raise UserError(f"{path} is not a vit-train checkpoint ({first_line(error)})") from None
    if not isinstance(checkpoint, dict) or not all(key in checkpoint for key in REQUIRED_KEYS):
        raise UserError(f"{path} is not a vit-train checkpoint (it lacks {', '.join(REQUIRED_KEYS)})")
    return checkpoint


def check_resume_length(path, step: int, total_steps: int):
    """A resumed run must be asked for at least the steps its checkpoint has done."""
    if total_steps < step:
        raise UserError(f"{path} is at step {step}, past the {total_steps} steps asked for; give --steps {step} or "
                        "more (or --epochs) to continue it")


def rng_state(device: torch.device) -> dict:
    """Every random generator this process draws from, in types `torch.load(weights_only=True)` accepts.

    The data order needs none: it is a pure function of (seed, epoch, batch), and the step is saved.
    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"], device)
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
