"""Checkpoints that resume: adapter (peft format), optimizer, scheduler, step and every RNG state.

A checkpoint is written into a temporary folder and renamed into place, so `checkpoint-STEP/` exists only when
complete; `latest()` ignores anything else. The newest `keep` checkpoints are kept. Under DeepSpeed the weights and
optimizer state are sharded over the processes, so each writes its own part (`save_sharded`, accelerate's
save_state) and the state file, written last, marks the folder complete.

Nothing is unpickled beyond tensors and plain values (weights_only=True; RNG states are stored in that form; in
DeepSpeed's files a few known classes besides): a checkpoint holding a file that needs more, which could run code
while loading, is refused before anything loads. A checkpoint with a file that does not read whole (truncated,
empty, not JSON) is named with that file, and `--resume` takes the newest checkpoint that reads whole instead
(`resumable`).
"""

from __future__ import annotations

import contextlib
import json
import pickle
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from qlora_rft.errors import UserError
from qlora_rft.files import atomic_folder, reporting_full_disk
from qlora_rft.pretrained import save_adapter

_NAME = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def rng_state() -> dict:
    """This process's RNG states as tensors and plain values, which `torch.load(weights_only=True)` reads."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = [name, keys.tolist(), pos, has_gauss, cached_gaussian]  # keys: [624] uint32
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output_dir: Path, step: int, model, optimizer, scheduler, extra: dict | None = None, keep: int = 0,
         rng_states: list[dict] | None = None) -> Path:
    """Write checkpoint-STEP/ atomically; prune to the newest `keep` (0: keep all).

    `model` is the PeftModel (its adapter is saved) or, in full mode, the whole model (its state dict).
    `rng_states`: one per process under DDP (rng.pt, rng-1.pt, ...); None: this process's.
    """
    final = output_dir / f"checkpoint-{step}"
    with reporting_full_disk(str(final), _kept(output_dir)), atomic_folder(final) as tmp:
        if hasattr(model, "peft_config"):
            save_adapter(model, tmp / "adapter")
        else:
            _torch_save(model.state_dict(), tmp / "model.pt")
        _torch_save(optimizer.state_dict(), tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        for rank, state in enumerate(rng_states or [rng_state()]):
            _torch_save(state, tmp / _rng_file(rank))
        (tmp / STATE_FILE).write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
    _prune(output_dir, keep)
    return final


def _torch_save(obj, path: Path) -> None:
    with open(path, "wb") as f:  # through a Python file, so that a full disk raises its OSError (ENOSPC)
        torch.save(obj, f)


def _kept(output_dir: Path) -> str:
    """What a failed checkpoint write leaves to go on from."""
    previous = latest(output_dir)
    if previous is None:
        return "no earlier checkpoint was complete: free some space and start again with --overwrite"
    return f"the previous checkpoint, {previous.name}, is kept: free some space and continue with --resume"


def _prune(output_dir: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints (0: keep all)."""
    if keep:
        for old in all_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def all_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder counts once its state file is there)."""
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = _NAME.match(path.name)
        if match and (path / STATE_FILE).is_file():
            found.append((int(match.group(1)), path))
    return [p for _, p in sorted(found)]


def latest(output_dir: Path) -> Path | None:
    found = all_checkpoints(output_dir)
    return found[-1] if found else None


def load(path: Path, model, optimizer, scheduler, rank: int = 0, world_size: int = 1) -> dict:
    """Restore the adapter (or full mode's weights), optimizer, scheduler and this process's RNG states; returns the
    saved trainer state. A file whose content does not fit what it restores is named."""
    state = _trainer_state(path, world_size)
    check_plain(path)  # every file, in every process: all refuse alike
    if (path / "adapter").is_dir():
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        from qlora_rft.model import check_adapter_shapes

        weights = path / "adapter" / "adapter_model.safetensors"
        check_adapter_shapes(model, weights, f"{path.name}'s adapter")
        with _restoring(weights):
            set_peft_model_state_dict(model, load_file(str(weights)))
    else:
        weights = load_plain(path / "model.pt")
        own = model.state_dict()
        differ = [k for k, v in weights.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if differ or own.keys() != weights.keys():
            first = differ[0] if differ else sorted(own.keys() ^ weights.keys())[0]
            raise UserError(f"{path / 'model.pt'} holds the weights of another model ({first} differs from this "
                            "run's): resume with the model it was trained from (model.name_or_path)")
        model.load_state_dict(weights)
    for file, restore in ((path / "optimizer.pt", optimizer.load_state_dict),
                          (path / "scheduler.pt", scheduler.load_state_dict), (path / _rng_file(rank), set_rng_state)):
        with _restoring(file):
            restore(load_plain(file))
    return state


@contextlib.contextmanager
def _restoring(file: Path):
    """Restoring from `file`: content that does not fit what it restores (another optimizer's state, an RNG file
    of another layout) is a UserError naming it."""
    try:
        yield
    except (KeyError, ValueError, TypeError, IndexError, RuntimeError) as e:
        raise UserError(f"{file} does not hold what this run restores from it ({type(e).__name__}: "
                        f"{_first_line(e)}): resume from another checkpoint, or start afresh with --overwrite") from None


class Damaged(UserError):
    """A checkpoint file that does not read whole (truncated, empty, not what it should be); the message names it."""


def load_plain(file: Path, allowed: list | None = None, mmap: bool = False):
    """A torch.save file of tensors and plain values (and the `allowed` classes), read with weights_only=True: a file
    that needs more (a pickle of other objects, which could run any code while loading) is refused unread, and one
    that does not read whole is Damaged. mmap: the tensors are mapped from the file, not read (for checking)."""
    try:
        with torch.serialization.safe_globals(allowed or []):
            return torch.load(file, weights_only=True, mmap=mmap, map_location="cpu" if mmap else None)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" not in str(e):  # a pickle stream cut short, not one asking for more
            raise Damaged(f"{file} is truncated or corrupt ({_first_line(e)})") from None
        raise UserError(f"{file} was not loaded: it holds more than tensors and plain values, and unpickling it could "
                        "execute code (a file planted in the checkpoint, or one written by an older version): resume "
                        "from a checkpoint written by this version, or start afresh") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise Damaged(f"{file} is truncated or corrupt ({_first_line(e) or 'empty'})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def check_plain(folder: Path, allowed: list | None = None) -> None:
    """Refuse a checkpoint any of whose torch.save or pickle files (.pt, .pkl, .bin) `load_plain` would refuse."""
    for file in sorted(folder.rglob("*")):
        if file.suffix in (".pt", ".pkl", ".bin") and file.is_file():
            load_plain(file, allowed, mmap=True)


def read_state(path: Path) -> dict:
    """The checkpoint's state file: a JSON object with its step, else Damaged naming it."""
    file = path / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise Damaged(f"{file} is truncated or corrupt ({_first_line(e)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or isinstance(state["step"], bool):
        raise Damaged(f"{file} is not a checkpoint's state (no step)")
    return state


def check_whole(path: Path, allowed: list | None = None, sharded: bool = False) -> dict:
    """Read every file of a checkpoint as resuming will, restoring nothing: the state file, each JSON file, each
    safetensors file's header (it must cover the file), each torch file weights-only (mapped, not read); `save`'s
    files must all be there (`sharded`: DeepSpeed's, whatever they are). Returns the state; Damaged naming the
    first file missing or not reading whole (a file asking for more than plain values is refused as `load_plain`
    refuses it)."""
    from safetensors import SafetensorError, safe_open

    state = read_state(path)
    weights = "adapter/adapter_model.safetensors" if (path / "adapter").is_dir() else "model.pt"
    for name in [] if sharded else [weights, "optimizer.pt", "scheduler.pt", _rng_file(0)]:
        if not (path / name).is_file():
            raise Damaged(f"{path / name} is missing")
    for file in sorted(path.rglob("*")):
        if not file.is_file() or file.name == STATE_FILE:
            continue
        if file.suffix == ".json":
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as e:
                raise Damaged(f"{file} is truncated or corrupt ({_first_line(e)})") from None
        elif file.suffix == ".safetensors":
            try:
                with safe_open(str(file), framework="pt"):
                    pass
            except (SafetensorError, OSError) as e:
                raise Damaged(f"{file} is truncated or corrupt ({_first_line(e)})") from None
        elif file.suffix in (".pt", ".pkl", ".bin"):
            load_plain(file, allowed, mmap=True)
    return state


@dataclass(frozen=True)
class Resumable:
    """The checkpoint `--resume` continues from, and the newer ones passed over because a file was damaged."""

    path: Path
    state: dict
    damaged: list[str]  # one message per newer checkpoint, naming its damaged file


def resumable(output_dir: Path, sharded: bool = False) -> Resumable | None:
    """The newest complete checkpoint whose every file reads whole (`check_whole`; `sharded`: DeepSpeed's, with its
    known classes), with the newer ones that did not; None when there is no checkpoint. When none reads whole: a
    UserError naming each one's damaged file."""
    allowed = _sharded_classes() if sharded else None
    damaged = []
    for path in reversed(all_checkpoints(output_dir)):
        try:
            return Resumable(path, check_whole(path, allowed, sharded), damaged)
        except Damaged as e:
            damaged.append(str(e))
    if damaged:
        raise UserError(f"--resume: no checkpoint in {output_dir} reads whole ({'; '.join(damaged)}): start afresh "
                        "with --overwrite")
    return None


def _trainer_state(path: Path, world_size: int) -> dict:
    """The checkpoint's state file; a checkpoint resumes only with the number of processes that wrote it."""
    state = read_state(path)
    written_by = state.get("world_size", 1)  # checkpoints from before launches existed: one process
    if written_by != world_size:
        raise UserError(f"{path} was written by {written_by} process(es) and this run has {world_size}: resume "
                        f"with the same launch config (num_processes={written_by})")
    return state


def _rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-{rank}.pt"


def save_sharded(accelerator, output_dir: Path, step: int, extra: dict | None = None, keep: int = 0) -> Path:
    """Every process writes its shards and RNG states into checkpoint-STEP/; then the main process marks it
    complete and prunes to the newest `keep`."""
    final = output_dir / f"checkpoint-{step}"
    with reporting_full_disk(str(final), _kept(output_dir)):
        accelerator.save_state(str(final))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (final / STATE_FILE).write_text(json.dumps({"step": step, **(extra or {})}, indent=2))
        _prune(output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def load_sharded(accelerator, path: Path, world_size: int) -> dict:
    """Restore a `save_sharded` checkpoint; it resumes under the launch config that wrote it.

    DeepSpeed unpickles its files, and accelerate the registered schedule, with weights_only=False: so every file
    is first read with weights_only=True, allowing only the classes they are known to hold."""
    state = _trainer_state(path, world_size)
    check_plain(path, _sharded_classes())
    accelerator.load_state(str(path))
    return state


def _sharded_classes() -> list:
    """Beyond tensors and plain values: DeepSpeed's optimizer bookkeeping, and the numpy RNG state that accelerate
    itself loads with weights_only=True (its own list)."""
    from accelerate.utils.other import TORCH_SAFE_GLOBALS
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [*TORCH_SAFE_GLOBALS, ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]
