"""Make the Triton interpreter patch `triton.language` once per launch, not once per helper call.

Under `TRITON_INTERPRET=1`, every call of a `@triton.jit` helper inside a kernel (tile_matmul,
the plan's tile lookup, the epilogue slices, `tl.zeros` itself) re-patches the language modules
that the helper's globals see, walking them with `inspect.getmembers`: measured on the CI
machine, a third of the time of an interpreted moe_mlp forward and backward. The patches of one
launch stay in place until it ends, so a helper whose modules were patched earlier in the same
launch needs nothing: `install` skips those repeats and leaves every other call to Triton.
Interpreted results are unchanged (tests/test_interpreter_patching.py compares them bitwise).

Only the test suite installs this; it reaches into a private function of the interpreter
(`triton.runtime.interpreter._patch_lang`) and does nothing where that is missing.
"""

import inspect

import triton.language as tl

_LANGS = (tl, tl.core)


class _Nothing:
    """The scope of a skipped patch: nothing to restore."""

    def restore(self) -> None:
        pass


def install() -> bool:
    """Wrap the interpreter's `_patch_lang`; False where this Triton has none."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return False
    real = getattr(interpreter, "_patch_lang", None)
    if real is None or getattr(real, "once_per_launch", False):
        return real is not None
    launch = {"running": False, "patched": set()}  # modules the running launch patched

    def patch_lang(fn):
        langs = {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in _LANGS}
        if launch["running"]:  # a helper called inside a kernel
            if langs <= launch["patched"]:
                return _Nothing()
            launch["patched"] |= langs
            return real(fn)
        scope = real(fn)  # a kernel launch: its scope is restored when the grid has run
        launch["running"], launch["patched"] = True, langs
        restore = scope.restore

        def restore_and_end():
            launch["running"] = False
            restore()

        scope.restore = restore_and_end
        return scope

    patch_lang.once_per_launch = True
    patch_lang.original = real
    interpreter._patch_lang = patch_lang
    return True
