"""Classic mode: cachefilesd-py against the cachefilesd it replaces, side by side.

Run from the host (boots the test kernel; everything happens in the guest):

    python scripts/vmtest --memory 2G --timeout 3000 -- \\
        python -m bench.bench_classic [--objects 9000] [--object-kb 16] [--free-pct 16] \\
            [--brun 60 --bcull 45 --bstop 10] [--source synthetic|kernel] [--rounds 1] \\
            [--strace] [--profile] [--probe] [--importtime]

It builds one classic cache image (``bench/classic_cache.py``: ``--objects`` objects of
``--object-kb`` KiB in the kernel's layout of a 9p ``cache=fscache`` cache, the
filesystem filled to ``--free-pct`` free blocks), then for each daemon copies that image,
mounts the copy at the same path, drops the guest's caches and starts the daemon with
``-n -s -f CONF`` and the same configuration (``dir``, ``tag``, ``brun``/``bcull``/
``bstop``): cachefilesd C (Debian's ``/sbin/cachefilesd``) and ``cachefilesd-py``.
Free space starts below *bcull*, so the kernel asks for culls at once and keeps asking
until free space is back at *brun* (``bench/classic_run.py`` says how each figure is
taken). The table gives, per daemon: time to brun from exec and from ``bound``, objects
culled and culls per second of the cull phase, bytes freed beyond what brun needed,
peak RSS and the kernel's own cull count; then the ratios cachefilesd-py / C.

Diagnostics (extra runs after the measured ones, their timings perturbed):
``--strace`` runs each daemon under ``strace -f -c`` (syscall counts per culled object);
``--profile`` runs cachefilesd-py under ``py-spy record`` (where its Python time goes);
``--probe`` times the pieces of one cull in isolation (``bench/classic_probe.py``);
``--importtime`` times cachefilesd-py's imports in the guest (``python -X importtime``).

Results also go to ``classic-bench.json`` (and the daemons' logs to ``classic-logs/``)
in the guest's results folder, which ``scripts/vmtest --results DIR`` keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from bench.classic_cache import BuiltCache, CacheSpec, NinePShare, build_cache, copy_image, mounted
from bench.classic_run import Limits, RunResult, Watcher

WORK = Path("/tmp/vm/classic-bench")
NAMES = {"c": "cachefilesd C", "py": "cachefilesd-py"}


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def results_dir() -> Path:
    return Path(os.environ.get("CACHEFILESD_VM_RESULTS", str(WORK))).absolute()


def installed_copy() -> dict[str, str]:
    """cachefilesd_py as an installed package has it: its modules with their byte code.
    This checkout is an editable install, read-only in the guest, and these machines set
    PYTHONDONTWRITEBYTECODE, so run from it the daemon would compile its whole package
    from source at every start. The package is copied to the guest's /tmp with its byte
    code compiled, and put first on the daemon's PYTHONPATH (the environment returned)."""
    import compileall

    import cachefilesd_py

    site = WORK / "site"
    dst = site / "cachefilesd_py"
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(
        Path(cachefilesd_py.__file__).parent, dst, ignore=shutil.ignore_patterns("__pycache__")
    )
    if not compileall.compile_dir(dst, quiet=1):
        raise RuntimeError(f"could not byte-compile {dst}")
    return {"PYTHONPATH": str(site)}


#: standard-library parts the daemon never imports (not copied by local_program_files)
_NOT_NEEDED = ("test", "site-packages", "idlelib", "tkinter", "turtledemo", "ensurepip", "lib2to3")


def local_program_files(env: dict[str, str]) -> dict[str, str]:
    """``--program-files local``: each daemon's program files copied to the guest's
    tmpfs and bind-mounted over the originals (in the guest's mount namespace only).

    The guest's root is the host's over 9p, and ``drop_caches`` before each run makes
    every file a daemon reads at start-up a round trip to the host through emulated
    virtio: one binary and libc for C, the interpreter, a 23 MB libpython and ~200
    modules for Python. An installed package reads them from a local disk. Here: the
    base interpreter's prefix (``bin/``, ``libpython``, the standard library without
    its test suite and other parts the daemon never imports) replaces the original in
    place, the runtime dependencies' files (``importlib.metadata``, recursively, no
    extras) join the package copy on ``PYTHONPATH``, and cachefilesd-py is started by
    the base interpreter (``-s``: no venv, no editable-install finder). C's binary is
    copied and bind-mounted the same way. libc and the other system libraries stay on
    9p for both."""
    import importlib.metadata as md
    import re as _re

    from bench.classic_run import C_DAEMON, PY_PROG_ENV

    base = Path(sys.base_prefix)
    stdlib = f"python{sys.version_info.major}.{sys.version_info.minor}"
    prefix = WORK / "prefix"
    shutil.rmtree(prefix, ignore_errors=True)
    (prefix / "lib").mkdir(parents=True)
    shutil.copytree(base / "bin", prefix / "bin", symlinks=True)
    for lib in (base / "lib").iterdir():
        if lib.name.startswith("libpython"):
            shutil.copy2(lib, prefix / "lib" / lib.name, follow_symlinks=False)
    shutil.copytree(
        base / "lib" / stdlib,
        prefix / "lib" / stdlib,
        symlinks=True,
        ignore=lambda d, names: [
            n
            for n in names
            if Path(d) == base / "lib" / stdlib and (n in _NOT_NEEDED or n.startswith("config-"))
        ],
    )
    subprocess.run(["mount", "--bind", str(prefix), str(base)], check=True)
    site = Path(env["PYTHONPATH"])
    todo, seen = ["cachefilesd-py"], set()
    while todo:
        name = todo.pop()
        key = _re.sub(r"[-_.]+", "-", name).lower()
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # for another platform (pyroute2's win_inet_pton): not installed here
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(_re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
        if key == "cachefilesd-py":
            continue  # the byte-compiled copy is on PYTHONPATH already
        for f in dist.files or []:
            src = Path(str(dist.locate_file(f)))
            if ".." in f.parts or not src.is_file():
                continue  # console scripts in bin/, and the like
            dst = site / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    c_copy = WORK / "cachefilesd-c"
    shutil.copy2(C_DAEMON, c_copy)
    subprocess.run(["mount", "--bind", str(c_copy), C_DAEMON], check=True)
    py = base / "bin" / stdlib
    code = "import sys; from cachefilesd_py.daemon.cli import main; sys.exit(main())"
    return {**env, PY_PROG_ENV: json.dumps([str(py), "-s", "-c", code])}


class HostClock:
    """How fast the guest's clock runs against the host's. Under QEMU/TCG the guest
    calibrates its TSC at boot while the host is busy, and its clock can run several
    times too fast (the kernel's "Long readout interval" watchdog line shows it); every
    second this benchmark prints is a guest second. The results folder is the host's
    directory over 9p, and a file written there gets its mtime from the host's clock, so
    touching one at the start and at the end gives host seconds for the same interval.
    Ratios between the daemons, taken on one clock in one run, are unaffected."""

    def __init__(self) -> None:
        self.path = results_dir() / ".host-clock"
        self.start = self._stamp()

    def _stamp(self) -> tuple[float, int]:
        t = time.monotonic()
        self.path.write_text(str(t))
        return t, self.path.stat().st_mtime_ns

    def guest_per_host(self) -> tuple[float, float, float]:
        """(guest s, host s, guest s per host s) since the start."""
        (g0, h0), (g1, h1) = self.start, self._stamp()
        host = (h1 - h0) / 1e9
        return g1 - g0, host, (g1 - g0) / host if host > 0 else float("nan")


class Bench:
    def __init__(
        self, built: BuiltCache, limits: Limits, args: argparse.Namespace, env: dict[str, str]
    ) -> None:
        self.env = env
        self.built = built
        self.limits = limits
        self.args = args
        self.logs = results_dir() / "classic-logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def one(self, daemon: str, *, wrap: list[str] | None = None, wrapped: str = "") -> RunResult:
        """One daemon on a fresh copy of the cache image, at the same mount point."""
        self.n += 1
        image, mnt = WORK / "run.img", WORK / "cache"
        copy_image(self.built.image, image)
        try:
            with mounted(image, mnt) as root:
                conf = WORK / "cachefilesd.conf"
                conf.write_text(self.limits.config(root, "bench"))
                drop_caches()
                label = f"{self.n:02d}-{daemon}{'-' + wrapped if wrapped else ''}"
                watcher = Watcher(
                    daemon,
                    root,
                    conf,
                    wrap=wrap,
                    wrapped=wrapped,
                    env=self.env,
                    settle=self.args.settle,
                    timeout=self.args.timeout,
                    log_path=self.logs / f"{label}.log",
                )
                result = watcher.run(self.limits)
        finally:
            image.unlink(missing_ok=True)
        return result


# -- the table ----------------------------------------------------------------------------


def fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}×"


def columns(r: RunResult) -> dict[str, float | None]:
    mib = 1 << 20
    return {
        "exec → bound s": r.since_exec(r.bound_t),
        "bound → 1st cull s": r.since_bound(r.first_cull_t),
        "bound → brun s": r.since_bound(r.brun_t),
        "exec → brun s": r.since_exec(r.brun_t),
        "objects culled": r.culled,
        "culls/s": r.culls_per_second,
        "needed MiB": r.needed_bytes / mib,
        "culled beyond MiB": r.overshoot_bytes / mib,
        "peak RSS MiB": None if r.vmhwm_kib is None else r.vmhwm_kib / 1024,
        "cgroup peak MiB": None if r.cgroup_peak is None else r.cgroup_peak / mib,
        "kernel culls": r.kernel_culls,
    }


def print_table(results: list[RunResult]) -> None:
    cols = list(columns(results[0]))
    print("| daemon | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for r in results:
        vals = columns(r)
        cells = [fmt(vals[c], 0 if c in ("objects culled", "kernel culls") else 2) for c in cols]
        flag = " (timed out)" if r.timed_out else ""
        print(f"| {NAMES[r.daemon]}{flag} | " + " | ".join(cells) + " |")
    by = {d: [r for r in results if r.daemon == d] for d in ("c", "py")}
    if by["c"] and by["py"]:
        rounds = min(len(by["c"]), len(by["py"]))
        for i in range(rounds):
            c, p = columns(by["c"][i]), columns(by["py"][i])
            cells = [ratio(p[col], c[col]) for col in cols]
            print(f"| py / C (round {i + 1}) | " + " | ".join(cells) + " |")


def py_details(r: RunResult) -> str:
    """What cachefilesd-py's JSON log tells about its passes."""
    events = []
    for t, line in r.log:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        if isinstance(ev, dict):
            events.append((t - r.exec_t, ev))
    passes = [(t, ev) for t, ev in events if ev.get("event") == "cull.pass"]
    final = next((ev for _, ev in reversed(events) if ev.get("event") == "stats"), {})
    index = next((t for t, ev in events if ev.get("event") == "index.ready"), None)
    names = Counter(str(ev.get("event")) for _, ev in events)
    parts = [
        f"index ready at {fmt(index)} s",
        "passes (end s: culled): " + ", ".join(f"{t:.2f}: {ev.get('culled')}" for t, ev in passes),
        f"stats culled={final.get('culled')} busy={final.get('busy')} "
        f"index_events={final.get('index_events')}",
        f"{len(events)} log lines ({dict(names.most_common(6))})",
    ]
    return "; ".join(parts)


def c_details(r: RunResult) -> str:
    lines = [line for _, line in r.log]
    return f"{len(lines)} stderr lines: {lines[:4]}"


# -- diagnostics ------------------------------------------------------------------------


def strace_runs(bench: Bench, daemons: list[str]) -> None:
    if shutil.which("strace") is None:
        print("strace: not installed (scripts/setup installs it)")
        return
    for daemon in daemons:
        out = results_dir() / f"strace-{daemon}.txt"
        r = bench.one(
            daemon, wrap=["strace", "-f", "-c", "-S", "calls", "-o", str(out)], wrapped="strace"
        )
        print(
            f"\n{NAMES[daemon]} under strace -f -c: {r.culled} objects culled, "
            f"exec → brun {fmt(r.since_exec(r.brun_t))} s (slowed by ptrace)"
        )
        print_strace(out, max(1, r.culled))


def print_strace(path: Path, culled: int) -> None:
    rows = []
    for line in path.read_text().splitlines():
        f = line.split()
        if len(f) >= 5 and f[0].replace(".", "").isdigit() and f[-1] != "total":
            calls_at = 3
            calls, errors = int(f[calls_at]), 0
            if len(f) == 6:
                errors = int(f[4])
            rows.append((f[-1], calls, errors, float(f[1])))
    rows.sort(key=lambda x: -x[1])
    print("| syscall | calls | errors | per culled object | seconds |")
    print("|---|---|---|---|---|")
    for name, calls, errors, secs in rows[:14]:
        print(f"| {name} | {calls} | {errors} | {calls / culled:.2f} | {secs:.3f} |")


def profile_run(bench: Bench) -> None:
    pyspy = Path(sys.executable).parent / "py-spy"
    if not pyspy.exists():
        print("py-spy: not installed in the venv (it is in the test extra)")
        return
    out = results_dir() / "py-spy-classic.txt"
    wrap = [
        str(pyspy),
        "record",
        "--nonblocking",
        "--rate",
        "200",
        "--format",
        "raw",
        "-o",
        str(out),
        "--",
    ]
    r = bench.one("py", wrap=wrap, wrapped="py-spy")
    print(
        f"\ncachefilesd-py under py-spy (200 Hz, non-blocking): exec → brun "
        f"{fmt(r.since_exec(r.brun_t))} s, {r.culled} culled"
    )
    if out.exists():
        print_profile(out)


def print_profile(path: Path, top: int = 18) -> None:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_n: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [
            f.split(" (")[0] + " (" + f.split(" (")[-1].rsplit(":", 1)[0].split("/")[-1] + ")"
            for f in stack.split(";")
            if f
        ]
        if frames:
            self_n[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    print(f"{total} samples")
    print("| function | inclusive % | self % |")
    print("|---|---|---|")
    for f, n in incl.most_common(top):
        print(f"| {f} | {100 * n / total:.1f} | {100 * self_n[f] / total:.1f} |")
    print("\nself time, top:")
    for f, n in self_n.most_common(12):
        print(f"  {100 * n / total:5.1f} %  {f}")


def importtime(env: dict[str, str]) -> None:
    """cachefilesd-py's start-up in the guest (from the byte-compiled copy the daemon
    runs from): a bare interpreter, then the imports of its classic-mode path, as a
    tree of the imports that take at least 2 % of the time."""
    full = dict(os.environ, **env)
    # from "/" as the daemon runs: ``python -c`` puts its working directory first on
    # sys.path, and from the checkout that would import the package's sources instead
    t = time.monotonic()
    subprocess.run([sys.executable, "-c", "pass"], check=True, env=full, cwd="/")
    bare = time.monotonic() - t
    # what ``cachefilesd-py -n -s -f CONF`` imports in classic mode: structlog as the
    # command line imports it (daemon/lean_imports.py), the modules up to ``bind``
    # (daemon.start), then what a classic worker needs (daemon.app.import_mode)
    mods = (
        "cachefilesd_py.daemon.cli, cachefilesd_py.daemon.start, "
        "cachefilesd_py.frontends.classic.driver"
    )
    code = (
        "from cachefilesd_py.daemon.lean_imports import import_structlog; import_structlog(); "
        f"import {mods}; import cachefilesd_py; print(cachefilesd_py.__file__)"
    )
    t = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        check=True,
        capture_output=True,
        text=True,
        env=full,
        cwd="/",
    )
    with_imports = time.monotonic() - t
    rows: list[tuple[int, int, int, str]] = []  # (depth, self µs, cumulative µs, module)
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_text, cum_text, name = line[len("import time:") :].split("|", 2)
        name = name[1:]
        depth = (len(name) - len(name.lstrip())) // 2
        rows.append((depth, int(self_text), int(cum_text), name.strip()))
    top = min(d for d, _, _, _ in rows)
    total = sum(c for d, _, c, _ in rows if d == top)
    print(
        f"\nstart-up in the guest: `python -c pass` {bare:.2f} s; python + `import {mods}` "
        f"{with_imports:.2f} s (imports {total / 1e6:.2f} s, {len(rows)} modules; "
        f"package from {proc.stdout.strip()})"
    )
    print("| import (nesting shown by indent) | self s | cumulative s |")
    print("|---|---|---|")
    # -X importtime prints a module after its imports: reverse for a top-down tree
    for depth, self_us, cum_us, name in reversed(rows):
        if cum_us >= total * 0.02:
            pad = "· " * (depth - top)
            print(f"| {pad}{name} | {self_us / 1e6:.3f} | {cum_us / 1e6:.3f} |")


# -- main -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", type=int, default=9000)
    ap.add_argument("--object-kb", type=int, default=16)
    ap.add_argument("--free-pct", type=float, default=16.0)
    ap.add_argument("--brun", type=int, default=60)
    ap.add_argument("--bcull", type=int, default=45)
    ap.add_argument("--bstop", type=int, default=10)
    ap.add_argument("--source", choices=("synthetic", "kernel"), default="synthetic")
    ap.add_argument("--data", choices=("fallocate", "write"), default="fallocate")
    ap.add_argument(
        "--daemons", default="c,py", help="c and/or py in the first round's order, or none"
    )
    ap.add_argument("--rounds", type=int, default=1, help="rounds, order reversed each round")
    ap.add_argument("--settle", type=float, default=2.0)
    ap.add_argument("--timeout", type=float, default=900.0, help="per daemon run")
    ap.add_argument(
        "--program-files",
        choices=("9p", "local"),
        default="9p",
        help="where the daemons' program files are read from after drop_caches: the "
        "guest's 9p root (the host's files), or copies on the guest's tmpfs, as an "
        "installed package on a local disk",
    )
    ap.add_argument("--strace", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--probe", action="store_true")
    ap.add_argument("--importtime", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    out = (args.json or results_dir() / "classic-bench.json").absolute()
    if os.geteuid() != 0 or not os.path.exists("/dev/cachefiles"):
        print("needs root and /dev/cachefiles: run it in the test guest (scripts/vmtest)")
        return 2
    daemons = [d.strip() for d in args.daemons.split(",") if d.strip() not in ("", "none")]
    if any(d not in NAMES for d in daemons):
        ap.error(f"--daemons takes c and/or py, not {args.daemons}")
    if not args.bstop < args.bcull < args.brun < 100:
        ap.error("limits must satisfy bstop < bcull < brun < 100")
    if args.free_pct >= args.bcull:
        ap.error("--free-pct must be below --bcull, or nothing needs culling")
    spec = CacheSpec(args.objects, args.object_kb, args.free_pct, args.source, args.data)
    limits = Limits(args.brun, args.bcull, args.bstop)
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    clock = HostClock()
    built = build_cache(spec, WORK, NinePShare.from_env())
    print(
        f"cache: {built.objects} objects of {spec.object_kb} KiB ({built.kernel_made} made by "
        f"the kernel through 9p cache=fscache, the rest {spec.source} clones, blocks by "
        f"{spec.data}) in {built.volume}; ext4 {built.size_mb:.0f} MB, "
        f"{built.free_pct:.2f} % free, {built.free_files} of {built.files} inodes free; "
        f"built in {built.build_seconds:.1f} s"
    )
    for note in built.notes:
        print(f"  note: {note}")
    print(
        f"limits brun {limits.brun} % / bcull {limits.bcull} % / bstop {limits.bstop} %; "
        f"kernel {os.uname().release}; {os.cpu_count()} vCPUs (QEMU TCG)\n"
    )
    env = installed_copy()
    print(f"cachefilesd-py runs from a byte-compiled copy of the package ({env})")
    if args.program_files == "local":
        env = local_program_files(env)
        print(
            "program files on the guest's own tmpfs (--program-files local): the interpreter, "
            "libpython, the standard library and the runtime dependencies for cachefilesd-py, "
            "the binary for cachefilesd C; dropped caches do not send their reads over 9p"
        )
    bench = Bench(built, limits, args, env)
    results: list[RunResult] = []
    for rnd in range(args.rounds):
        order = daemons if rnd % 2 == 0 else list(reversed(daemons))
        for daemon in order:
            results.append(bench.one(daemon))
    if results:
        print_table(results)
        print()
    for r in results:
        info = py_details(r) if r.daemon == "py" else c_details(r)
        print(f"- {NAMES[r.daemon]}: exit {r.exit_code}; {info}")
    guest_s, host_s, skew = clock.guest_per_host()
    print(
        f"\nclock: {guest_s:.0f} guest s took {host_s:.0f} host s (guest clock runs "
        f"{skew:.2f}x the host's; seconds above are guest seconds)"
    )
    if args.strace:
        strace_runs(bench, daemons)
    if args.profile:
        profile_run(bench)
    if args.probe:
        from bench.classic_probe import probe

        probe(built, WORK)
    if args.importtime:
        importtime(env)
    out.write_text(
        json.dumps(
            {
                "spec": asdict(spec),
                "limits": asdict(limits),
                "cache": {k: v for k, v in asdict(built).items() if k != "spec"},
                "runs": [{**asdict(r), "columns": columns(r)} for r in results],
            },
            default=str,
            indent=1,
        )
    )
    ok = all(r.brun_t is not None and r.exit_code == 0 for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
