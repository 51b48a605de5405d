"""The fuzzing campaign of MeshNet's decoders (``make fuzz``; a slice runs in ``make test``).

Every door through which a peer's bytes (or an operator's text) enter MeshNet gets
random, mutated and structure-aware inputs, 100,000 each by default, in worker
processes under a memory limit; an input that raises an untyped error, needs too much
memory, kills or hangs its worker, or costs far more than its size explains is a
failure, reported with its bytes. Modules: ``cbor_shapes`` (hand-written CBOR),
``mutations``, ``generators`` (inputs per decoder), ``targets`` (the decoders),
``checker`` (one input), ``campaign`` (the worker pool and the rules), ``report``.
"""
