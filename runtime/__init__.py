"""Where a model lives: loading, the one memory plan, placement (in memory, streamed, spread over
GPUs), the dense snapshot, quantized copies, caches and the one layer-by-layer loop.

Everything that reads or writes a weight goes through here; ``prune`` (the method) is pure and
``evaluation.Lab`` (the door) is the only caller of the ``Pruner``.
"""
