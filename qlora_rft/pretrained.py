"""Every from_pretrained of the project: local files only, no code from a model folder, and transformers' hub
kernels off unless `model.hub_kernels` asks for them.

transformers 5.25 turns "hub kernels" on at every model load by default: on CUDA it downloads kernel code from the
model hub and runs it (offline, the load fails). Models here are always local folders, so nothing needs the network;
`trust_remote_code=False` keeps an `auto_map` in a folder's config from running the folder's Python files.
Two more default fetches are closed here: bitsandbytes' kernel download at import (`keep_bitsandbytes_local`) and,
in `data.py`, datasets' download counter.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

LOCAL = {"local_files_only": True}  # a path that is not a folder is an error, never a hub download
NO_CODE = {"trust_remote_code": False, **LOCAL}


def load_model(cls, path: str | Path, hub_kernels: bool = False, **kwargs):
    """`cls.from_pretrained(path, **kwargs)` with hub kernels only when `hub_kernels` (model.hub_kernels)."""
    return cls.from_pretrained(str(path), use_kernels=hub_kernels, **NO_CODE, **kwargs)


def load_processor(path: str | Path, padding_side: str | None = None):
    """The folder's processor (tokenizer, image and video processors); `padding_side="left"` for batched
    generation."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(path), **NO_CODE)
    if padding_side is not None:
        processor.tokenizer.padding_side = padding_side
    return processor


def load_config(path: str | Path):
    """The folder's config.json as transformers reads it (text_config, vision_config)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(str(path), **NO_CODE)


def load_image_processor(path: str | Path):
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(str(path), **NO_CODE)


def load_generation_config(path: str | Path):
    """The folder's generation_config.json (OSError when it has none)."""
    from transformers import GenerationConfig

    return GenerationConfig.from_pretrained(str(path), **LOCAL)


def load_adapter(model, adapter: str | Path, trainable: bool):
    """The peft adapter folder `adapter` applied to `model` (not merged)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter), is_trainable=trainable, **LOCAL)


def save_adapter(model, folder: str | Path, state_dict: dict | None = None) -> None:
    """A PeftModel's adapters in peft's folder format (from `state_dict` when given: one gathered from ZeRO-3
    shards). The embeddings are never trained here, so peft is told not to look for them (its "auto" asks the hub
    about the base's name when that is not a local folder)."""
    model.save_pretrained(str(folder), state_dict=state_dict, save_embedding_layers=False)


class _BitsandbytesWithoutHubKernels(importlib.abc.MetaPathFinder):
    """Imports bitsandbytes' CPU backend with the `kernels` package hidden, then leaves the import system alone."""

    MODULE = "bitsandbytes.backends.cpu.ops"

    def find_spec(self, name, path=None, target=None):
        if name != self.MODULE:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            saved = sys.modules.get("kernels")
            sys.modules["kernels"] = None  # `from kernels import ...` raises ImportError: bitsandbytes' own kernel
            try:
                run(module)
            finally:
                if saved is None:
                    sys.modules.pop("kernels", None)
                else:
                    sys.modules["kernels"] = saved

        spec.loader.exec_module = exec_module
        return spec


def keep_bitsandbytes_local() -> None:
    """bitsandbytes 0.50, imported on a CPU with AVX512-BF16, asks the `kernels` package for a 4-bit matmul kernel
    from the model hub as it imports (downloaded and run; offline it falls back to its own, the kernel every test
    here ran). This makes that ask fail at once, whatever model.hub_kernels says. Called by the package's __init__,
    so it acts when qlora_rft is imported before bitsandbytes (any `qlora-rft` command)."""
    if "bitsandbytes" not in sys.modules and not any(isinstance(f, _BitsandbytesWithoutHubKernels)
                                                     for f in sys.meta_path):
        sys.meta_path.insert(0, _BitsandbytesWithoutHubKernels())
