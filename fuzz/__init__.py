"""Coverage-guided fuzzing of the daemon's input boundaries (atheris convention).

Each harness is ``fuzz/fuzz_<name>.py`` and exposes ``TestOneInput(data: bytes)``: it
feeds ``data`` to one boundary and raises (an ``AssertionError`` or whatever escaped)
only when the code under test broke its contract, e.g. the config parser let out
something other than a ``Config`` or a ``ConfigError``. ``fuzz/corpus/<name>/`` holds
its seed inputs (valid ones: real configurations, kernel messages, sidecars).

- ``python -m fuzz <name> [--seconds N] [--runs N]`` runs atheris (libFuzzer) on one
  harness: new inputs go to ``.fuzz/<name>/corpus/``, crashes to ``.fuzz/<name>/``.
- ``tests/unit/test_fuzz_harnesses.py`` runs every harness on its corpus and on
  mutations of it drawn by hypothesis: a short, deterministic run in CI.

Nothing here is imported by the daemon. See ``docs/security.md`` ("Fuzzing: how to
run") for the long runs and their results.
"""
