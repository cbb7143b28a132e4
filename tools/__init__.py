"""Development tools of the InstantFamily pack (run from the repository root, e.g. ``python tools/doctor.py``).

A package so that :mod:`tools.devkit` (helpers shared by the tests, the benchmarks and these scripts) imports by
its full name and no installed package called ``tools`` can shadow it. Nothing in the node pack imports it."""
