"""World handles: the ints the torch.library ops take in place of a world.

A world (process group, streams, buffers) cannot be an argument of a torch.library op, so every
world registers itself here when it is built and the ops take its `world.handle`. The registry
holds worlds weakly: a world lives as long as its user keeps it.
"""

import itertools
import weakref

_WORLDS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_NEXT = itertools.count(1)


def register(world) -> int:
    """A new handle for `world`."""
    handle = next(_NEXT)
    _WORLDS[handle] = world
    return handle


def world_from_handle(world_handle: int):
    """The world registered under `world_handle`."""
    try:
        return _WORLDS[world_handle]
    except KeyError:
        raise RuntimeError(
            f"no live overlap world has handle {world_handle}; keep a reference to the world "
            f"for as long as ops or layers use it"
        ) from None
