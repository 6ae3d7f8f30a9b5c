"""The compiled parts the worker's speed relies on, checked at start (a missing one only warns).

aiokafka decodes and encodes record batches in C unless ``AIOKAFKA_NO_EXTENSIONS`` is set or
its extensions failed to build (a platform without a wheel); Faust's stream iterator is Cython
(``cython_optimizations``); uvloop runs the event loop (``EVENT_LOOP=uvloop``, the default).
Without them the worker is correct, only slower.
"""

from __future__ import annotations

import importlib
import os


def missing() -> list[str]:
    """What is not loaded, each in words saying what it costs; empty when all is well."""
    found = []
    from aiokafka.record import default_records

    if os.environ.get("AIOKAFKA_NO_EXTENSIONS"):
        found.append("aiokafka's C extensions are switched off (AIOKAFKA_NO_EXTENSIONS is "
                     "set): records are encoded and decoded in Python, several times slower")
    elif default_records.DefaultRecordBatch is default_records._DefaultRecordBatchPy:
        found.append("aiokafka's C extensions are not built for this platform: records are "
                     "encoded and decoded in Python, several times slower")
    try:
        importlib.import_module("faust._cython.streams")
    except ImportError:
        found.append("Faust's Cython stream iterator is not built (faust._cython): every record "
                     "costs more")
    return found
