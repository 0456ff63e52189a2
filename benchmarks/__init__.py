"""Speed and memory benchmarks of pyrovae, run by hand: ``python benchmarks/run.py [--quick]``.

One module per benchmark (``bench_svi``, ``bench_ae``, ``bench_nll``, ``bench_scaling``,
``bench_profile``, ``bench_memory``), each with a function returning a dict of figures;
``references`` holds the hand-written contenders; ``common`` the shared helpers. Results
and how to read them: ``docs/benchmarks.md``.
"""
