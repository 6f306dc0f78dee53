"""spp-kernels start-up hook: registers SPP with peft and the 2:4 export format with
transformers as soon as each library is imported, so an SPP adapter or a `spp export-2to4`
directory opens in any tool (AutoPeftModelForCausalLM, transformers' load_adapter and
from_pretrained, lm-eval, TRL) without `import spp_kernels` in the user's code.

Installed with spp-kernels as site-packages/spp_kernels_hook.pth, whose one line is
`import _spp_kernels_hook; _spp_kernels_hook.install()` (and spp_kernels_hook.start,
`_spp_kernels_hook:install`, the PEP 829 form Python >= 3.15 runs instead of the .pth's
import line). At start-up this only puts a finder first on sys.meta_path, costing about
2 ms; the finder answers for two module names and nothing else:

  peft                           after peft/__init__ ran: import spp_kernels.adapters
                                 (PeftType.SPP, prefix and config; the tuner on first use)
  transformers.quantizers.auto   after it ran: import spp_kernels.sparsity.hf_quantizer
                                 (quant_method "spp_sparse24")

For each it finds the real spec with the other finders and wraps its loader (as wrapt's
post-import hooks do); the finder leaves sys.meta_path once both are done. Nothing here can
make an import fail: a registration error becomes a RuntimeWarning. Set
SPP_KERNELS_NO_HOOK=1 to turn the start-up hook off (`import spp_kernels` still registers
both, now or when the library is imported). This module imports only the standard library.
"""

import os
import sys

ENV = "SPP_KERNELS_NO_HOOK"
# watched module -> the spp_kernels module whose import registers with it
TARGETS = {
    "peft": "spp_kernels.adapters",
    "transformers.quantizers.auto": "spp_kernels.sparsity.hf_quantizer",
}


def _register(watched: str) -> None:
    registrar = TARGETS[watched]
    if registrar in sys.modules:
        # Imported (registered) or being imported, having imported `watched` itself: its
        # own code registers when it finishes.
        return
    try:
        __import__(registrar)
    except Exception as exc:  # noqa: BLE001 - never break the user's import
        import warnings

        warnings.warn(
            f"spp-kernels: {registrar} could not register with {watched.split('.')[0]} "
            f"({type(exc).__name__}: {exc}); `import spp_kernels` in your code does it "
            f"(set {ENV}=1 to turn this hook off)",
            RuntimeWarning,
            stacklevel=2,
        )


class _Loader:
    """Wraps a watched module's own loader: exec_module runs it, then registers."""

    def __init__(self, loader, watched: str) -> None:
        self.loader = loader
        self.watched = watched

    def __getattr__(self, name):  # is_package, get_code, get_resource_reader, ...
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        # The module keeps its real loader (as wrapt's post-import hooks do).
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        self.loader.exec_module(module)  # the library's own errors propagate unchanged
        _Finder.done.add(self.watched)
        if _Finder.done.issuperset(TARGETS):
            uninstall()
        _register(self.watched)


class _Finder:
    """sys.meta_path finder that answers only for the watched module names."""

    _busy = False
    done: set = set()

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname not in TARGETS or fullname in cls.done or cls._busy:
            return None
        cls._busy = True  # a finder below that calls importlib.util.find_spec cannot recurse
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is cls:
                    continue
                find_spec = getattr(finder, "find_spec", None)
                spec = find_spec(fullname, path, target) if find_spec is not None else None
                if spec is not None:
                    break
            if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _Loader(spec.loader, fullname)
            return spec  # None: not installed, the usual ModuleNotFoundError follows
        except Exception:  # noqa: BLE001 - any failure here: import as if no hook existed
            return None
        finally:
            cls._busy = False

    @classmethod
    def invalidate_caches(cls) -> None:
        pass


def install(force: bool = False) -> None:
    """Register now with what is imported already, watch for the rest. The start-up files
    call it as is (SPP_KERNELS_NO_HOOK=1 turns it off); `import spp_kernels` calls it with
    force=True."""
    if not force and os.environ.get(ENV, "").strip() not in ("", "0"):
        return
    waiting = False
    for watched in TARGETS:
        module = sys.modules.get(watched)
        if module is None:
            waiting = True
        elif not getattr(getattr(module, "__spec__", None), "_initializing", False):
            _Finder.done.add(watched)
            _register(watched)
        # else: being imported right now (spp_kernels imported from inside it): the hook's
        # loader registers when it finishes, or `import spp_kernels` does later
    if waiting and _Finder not in sys.meta_path:
        sys.meta_path.insert(0, _Finder)


def uninstall() -> None:
    while _Finder in sys.meta_path:
        sys.meta_path.remove(_Finder)
