"""``python -m fuzz <name> [--seconds N] [--runs N]``: coverage-guided fuzzing of
``fuzz/fuzz_<name>.py`` with atheris (libFuzzer).

- The package under test is instrumented as the harness imports it (nothing of
  ``cachefilesd_py`` may be imported before that, or it runs uninstrumented).
- libFuzzer reads ``.fuzz/<name>/corpus/`` (its own finds, kept between runs) and the
  seeds in ``fuzz/corpus/<name>/``, and writes new inputs only to the former; a crash
  is written to ``.fuzz/<name>/crash-<sha1>`` and ends the run with a traceback and a
  non-zero exit status. ``--merge`` folds the inputs that add coverage into the seeds
  (review them before committing).
- A harness's ``TOKENS`` (byte strings) become a libFuzzer dictionary
  (``.fuzz/<name>/tokens.dict``): mutations insert them whole.
- ``--replay FILE...`` runs the harness on given inputs without atheris (reproduce a
  crash, then turn it into a regression test).
- Logs are dropped while fuzzing: a harness's misses log warnings by design.

At the end libFuzzer prints ``stat::number_of_executed_units`` (executions) and its
last status line ``cov: N ft: M`` (coverage edges and features); ``docs/security.md``
records those of the long runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def harness_names() -> list[str]:
    return sorted(p.stem.removeprefix("fuzz_") for p in HERE.glob("fuzz_*.py"))


def silence_logs() -> None:
    import structlog

    def drop(*_args: object) -> None:
        raise structlog.DropEvent

    structlog.configure(processors=[drop], cache_logger_on_first_use=False)


def load(name: str, instrument: Callable[[], object] | None = None) -> ModuleType:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    if instrument is None:
        return importlib.import_module(f"fuzz.fuzz_{name}")
    with instrument():  # type: ignore[attr-defined]
        return importlib.import_module(f"fuzz.fuzz_{name}")


def _dict_escape(token: bytes) -> str:
    return "".join(chr(b) if 0x20 <= b < 0x7F and b not in b'"\\' else f"\\x{b:02x}" for b in token)


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=harness_names(), help="the harness: fuzz/fuzz_<name>.py")
    p.add_argument("--seconds", type=int, help="stop after this many seconds")
    p.add_argument("--runs", type=int, help="stop after this many inputs")
    p.add_argument("--work", type=Path, help="work directory (default .fuzz/<name>)")
    p.add_argument("--merge", action="store_true", help="merge new finds into the seeds")
    p.add_argument("--replay", nargs="+", type=Path, metavar="FILE", help="run these inputs")
    p.add_argument("libfuzzer", nargs="*", help="more libFuzzer flags, after --")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    seeds = HERE / "corpus" / args.name
    if args.replay:
        module = load(args.name)
        silence_logs()
        for path in args.replay:
            module.TestOneInput(path.read_bytes())
            print(f"{path}: ok")
        return 0
    import atheris

    module = load(args.name, lambda: atheris.instrument_imports(include=["cachefilesd_py"]))
    silence_logs()
    work = args.work or REPO / ".fuzz" / args.name
    found = work / "corpus"
    found.mkdir(parents=True, exist_ok=True)
    flags = [
        f"-artifact_prefix={work}/",
        f"-max_len={getattr(module, 'MAX_LEN', 4096)}",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
    ]
    tokens = [t for t in getattr(module, "TOKENS", ()) if t]
    if tokens:
        dictionary = work / "tokens.dict"
        dictionary.write_text("".join(f'"{_dict_escape(t)}"\n' for t in tokens))
        flags.append(f"-dict={dictionary}")
    if args.seconds:
        flags.append(f"-max_total_time={args.seconds}")
    if args.runs is not None:
        flags.append(f"-runs={args.runs}")
    dirs = [str(seeds), str(found)] if args.merge else [str(found), str(seeds)]
    if args.merge:
        flags.append("-merge=1")
    atheris.Setup([sys.argv[0], *flags, *args.libfuzzer, *dirs], module.TestOneInput)
    atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main())
