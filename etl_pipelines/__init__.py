"""The Dagster code location: wiring, not algorithms. ``definitions.py`` registers everything;
``ops/`` are peers that call one ``libs`` function per stage; ``resources/`` wrap the services;
``ray/`` is the only Ray glue; ``types.py`` holds what the ops hand each other."""
