"""Imported by every Python process started with this folder on PYTHONPATH and QLORA_RFT_SPY_LOG set: records, as
JSON lines in that file, each model load's hub-kernel and remote-code settings, each `set_use_kernels` call, and
every host name looked up or connected to (loopback and Unix sockets excepted)."""

import os

if os.environ.get("QLORA_RFT_SPY_LOG"):
    import importlib.abc
    import importlib.util
    import json
    import socket
    import sys

    LOG = os.environ["QLORA_RFT_SPY_LOG"]
    LOCAL = ("localhost", "127.0.0.1", "::1", "0.0.0.0", "")

    def record(kind, **info):
        with open(LOG, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": kind, "pid": os.getpid(), **info}, default=str) + "\n")

    def where():
        """The calls that led here, outermost first, this file's own left out."""
        import traceback

        return [f"{f.filename}:{f.lineno} {f.name}" for f in traceback.extract_stack()[:-2]][-25:]

    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if str(host) not in LOCAL:
            record("lookup", host=host, where=where())
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and str(address[0]) not in LOCAL:
            record("connect", address=address, where=where())
        return real_connect(self, address)

    socket.getaddrinfo, socket.socket.connect = getaddrinfo, connect

    def patch(module):
        model_class = module.PreTrainedModel
        load, set_kernels = model_class.from_pretrained.__func__, model_class.set_use_kernels

        def from_pretrained(cls, *args, **kwargs):
            record("load", cls=cls.__name__, use_kernels=kwargs.get("use_kernels", "unset"),
                   trust_remote_code=kwargs.get("trust_remote_code", "unset"))
            return load(cls, *args, **kwargs)

        def set_use_kernels(self, use_kernels, *args, **kwargs):
            record("set_use_kernels", cls=type(self).__name__, value=bool(use_kernels))
            return set_kernels(self, use_kernels, *args, **kwargs)

        model_class.from_pretrained = classmethod(from_pretrained)
        model_class.set_use_kernels = set_use_kernels

    class PatchOnImport(importlib.abc.MetaPathFinder):
        """Patches transformers.modeling_utils right after it is first imported."""

        def find_spec(self, name, path=None, target=None):
            if name != "transformers.modeling_utils":
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            run = spec.loader.exec_module

            def exec_module(module):
                run(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, PatchOnImport())
