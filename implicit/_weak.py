"""A weak stand-in for a function, for caches keyed on that function.

Several parts cache objects per user function (a solver loop and its CUDA graph per ``f``, a DDIM
stepper per noise model) in a ``weakref.WeakKeyDictionary``, so the cache entry goes when the
function does. That only works if the cached object does not hold the function itself: a value
that references its own key keeps it alive for good. Such objects call it through this instead.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable


def weak_callable(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn``, called through a weak reference: valid while someone else holds ``fn``."""
    ref = weakref.ref(fn)

    def call(*args: Any, **kwargs: Any) -> Any:
        target = ref()
        if target is None:
            raise ReferenceError("the function this cached object was built for no longer exists")
        return target(*args, **kwargs)

    return call
