"""What a block of code leaves to the cyclic garbage collector.

The services raise gen-0's threshold to 200,000 (shared.runtime.tune_gc), so what only the collector
can free lives until its rare older-generation passes. Compiled (shared.compiled), a coroutine keeps
all its locals in one scope object, and a closure defined in it refers back to that scope: each call
left its whole working set (a batch's records, facts, triggers) for the collector, and the triggers
worker's memory grew by tens of megabytes between full passes. A batch must be freed by reference
counting alone."""

from __future__ import annotations

import contextlib
import gc
from collections import Counter
from collections.abc import Iterator


@contextlib.contextmanager
def cyclic_garbage() -> Iterator[Counter]:
    """Collect first, then run the block with the collector off; the Counter yielded is filled with
    the types of the objects left unreachable in cycles when the block ends."""
    found: Counter = Counter()
    gc.collect()
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield found
    finally:
        gc.set_debug(gc.DEBUG_SAVEALL)
        try:
            gc.collect()
            found.update(type(o).__name__ for o in gc.garbage)
        finally:
            gc.garbage.clear()
            gc.set_debug(0)
            if was_enabled:
                gc.enable()
