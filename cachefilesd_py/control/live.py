"""``cachefilesctl`` sub-commands that ask the running daemon over its control socket.

Each prints a human-readable answer, or with ``--json`` the daemon's reply as it is
(one JSON document on stdout, for scripts). Exit status: 0 done, 1 the daemon refused
or failed (the reason on stderr), 2 bad usage, 3 no daemon to ask.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cachefilesd_py.control.cli import register
from cachefilesd_py.control.client import DEFAULT_SOCKET, call
from cachefilesd_py.control.presence_map import draw, png
from cachefilesd_py.control.schema import ControlError, ErrorCode
from cachefilesd_py.errors import CachefilesdError


def socket_path(args: argparse.Namespace) -> str:
    """``--socket``, else the configuration's ``control_socket`` (when the file is
    readable and valid), else the default."""
    if getattr(args, "socket", None):
        return str(args.socket)
    try:
        from cachefilesd_py.config.load import load_config

        cfg = load_config(args.f)
        if cfg.control_socket:
            return cfg.control_socket
    except Exception:  # an unreadable config (not root) or none: the default path
        pass
    return DEFAULT_SOCKET


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the daemon's reply as JSON")
    p.add_argument("--socket", metavar="PATH", help=f"control socket (default {DEFAULT_SOCKET})")
    p.add_argument("-f", default="/etc/cachefilesd.conf", metavar="FILE", help="configuration")


def _blob_names(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    """Shell completion of blob names: the daemon's open blobs (nothing if it is not
    reachable, never an error on the terminal)."""
    try:
        reply = call(socket_path(parsed_args), "blobs", timeout=2.0)
    except ControlError:
        return []
    return [b["blob"] for b in reply.get("blobs", []) if b["blob"].startswith(prefix)]


def _blob_arg(p: argparse.ArgumentParser, nargs: str | None = None) -> None:
    action = p.add_argument("blob", nargs=nargs, help="blob as 'blobs' lists it (volume/cookie)")
    action.completer = _blob_names  # type: ignore[attr-defined]


def ask(args: argparse.Namespace, op: str, **kwargs: Any) -> Any:
    return call(socket_path(args), op, **kwargs)


def run_live(fn: Any) -> Any:
    """Wraps a sub-command: a ControlError becomes a message and an exit status."""

    def run(args: argparse.Namespace) -> int:
        try:
            return int(fn(args))
        except ControlError as err:
            print(f"cachefilesctl: {err.code.value}: {err.message}", file=sys.stderr)
            return 3 if err.code is ErrorCode.UNAVAILABLE else 1
        except CachefilesdError as err:  # verify --offline: a bad configuration
            print(f"cachefilesctl: {err}", file=sys.stderr)
            return err.exit_code

    return run


def _print_json(value: Any) -> int:
    json.dump(value, sys.stdout, indent=2, sort_keys=True)
    print()
    return 0


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def human_age(seconds: float | None) -> str:
    """``"12 s ago"``, ``"3 min ago"``, ``"5 h ago"``, ``"2 d ago"`` (``-``: never)."""
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


# -- status ----------------------------------------------------------------------------


def _status(args: argparse.Namespace) -> int:
    st = ask(args, "status")
    if args.json:
        return _print_json(st)
    sp = st["space"]
    used = sp["bytes_total"] - sp["bytes_free"]
    th = sp["thresholds_pct"]
    free_pct = 100.0 * sp["bytes_free"] / sp["bytes_total"] if sp["bytes_total"] else 0.0
    print(f"cachefilesd-py {st['version']}  pid {st['pid']}  up {st['uptime_s']:.0f} s")
    print(f"mode          {st['mode']} ({st['kernel_interface']})")
    print(f"cache         {st['cache_dir']}")
    print(
        f"space         {human_bytes(used)} used of {human_bytes(sp['bytes_total'])}, "
        f"{free_pct:.1f}% free (cull below {th['bcull']}%, stop below {th['bstop']}%)"
    )
    print(
        f"files         {sp['files_free']} free of {sp['files_total']} (cull below {th['fcull']}%)"
    )
    caps = []
    if sp["cache_max_bytes"] is not None:
        caps.append(f"cache_max_bytes {human_bytes(sp['cache_max_bytes'])}")
    if sp["cache_max_objects"] is not None:
        caps.append(f"cache_max_objects {sp['cache_max_objects']}")
    caps += [f"volume_max_bytes {k} {human_bytes(v)}" for k, v in sp["volume_max_bytes"].items()]
    print(f"caps          {', '.join(caps) or 'none'}")
    print(
        f"objects       {st['objects']} kernel objects, {st['open_blobs']} blobs open, "
        f"{st['fetches_in_flight']} chunks being fetched"
    )
    for origin, src in st.get("sources", {}).items():
        since = "" if src.get("since_s") is None else f", {src['since_s']:.0f} s"
        why = f" ({src['reason']}{since})" if src.get("reason") or since else ""
        creds = f", credentials {src['credentials']}" if "credentials" in src else ""
        print(f"source        {origin}: {src['state']}{why}{creds}")
    if st.get("conflicts"):
        print(f"conflicts     {st['conflicts']} needing attention (cachefilesctl conflicts)")
    if "offline_policy" in st:
        pol = st["offline_policy"]
        rules = "".join(f", {r['pattern']}: {r['policy']}" for r in pol["rules"])
        print(f"offline       {pol['default']}{rules}")
    for image in st.get("images", []):  # fanotify mode
        state = "mounted" if image["mounted"] else "not mounted"
        print(f"image         {image['image']} on {image['mountpoint']} ({state})")
    for image in st.get("images_failed", []):
        print(f"image failed  {image['image']} on {image['mountpoint']}: {image['error']}")
    return 0


# -- blobs -----------------------------------------------------------------------------


def _blobs_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--limit", type=int, default=0, help="list at most this many")


def _blobs(args: argparse.Namespace) -> int:
    reply = ask(args, "blobs", limit=args.limit)
    if args.json:
        return _print_json(reply)
    rows = [("BLOB", "SIZE", "PRESENT", "CHUNK", "USERS", "LAST USE", "PINNED", "SOURCE")]
    for b in reply["blobs"]:
        rows.append(
            (
                b["blob"],
                human_bytes(b["size"]),
                f"{b['present_pct']:.1f}%",
                human_bytes(b["chunk_size"]),
                str(b["users"]),
                human_age(b.get("last_use_age_s")),
                "yes" if b["pinned"] else "no",
                b["source"],
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    if reply["total"] > len(reply["blobs"]):
        print(f"... {reply['total'] - len(reply['blobs'])} more")
    return 0


# -- show ------------------------------------------------------------------------------


def _show_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    _blob_arg(p)
    p.add_argument("--width", type=int, default=64, help="cells in the map (8..4096)")
    p.add_argument("--png", metavar="FILE", help="also write the map as a PNG image")


def _show(args: argparse.Namespace) -> int:
    reply = ask(args, "show", blob=args.blob, width=args.width)
    if args.png:
        Path(args.png).write_bytes(png(reply["cells"]))
    if args.json:
        return _print_json(reply)
    print(
        f"{reply['blob']}: {human_bytes(reply['size'])} in {reply['chunks']} chunks of "
        f"{human_bytes(reply['chunk_size'])}, {reply['present_chunks']} present "
        f"({reply['present_pct']:.1f}%), sidecar {'trusted' if reply['trusted'] else 'new'}"
    )
    per_cell = reply["chunks"] / max(1, len(reply["cells"]))
    print(f"one cell = {per_cell:.1f} chunks")
    for line in draw(reply["cells"], columns=64):
        print(line)
    return 0


# -- verify ----------------------------------------------------------------------------


def _verify_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "--offline",
        action="store_true",
        help="no daemon: check VOLUME COOKIE from the configuration and the cache tree",
    )
    _blob_arg(p, nargs="*")


def _verify(args: argparse.Namespace) -> int:
    if args.offline:
        from cachefilesd_py.control import commands

        if len(args.blob) != 2:
            print("cachefilesctl: verify --offline takes VOLUME COOKIE", file=sys.stderr)
            return 2
        args.volume, args.cookie = args.blob
        return commands.verify_offline(args)
    names = args.blob or [b["blob"] for b in ask(args, "blobs")["blobs"]]
    reports = [ask(args, "verify", blob=name, timeout=3600.0) for name in names]
    if args.json:
        return _print_json({"reports": reports}) or (0 if all(r["ok"] for r in reports) else 1)
    for r in reports:
        state = "ok" if r["ok"] else "FAILED"
        print(
            f"{r['blob']}: {state} trusted={r['trusted']} chunks={r['chunks']} "
            f"present={r['present']} lagging={r['lagging']} errors={len(r['errors'])}"
        )
        for err in r["errors"][:20]:
            print("  " + err)
    return 0 if all(r["ok"] for r in reports) else 1


# -- stats -----------------------------------------------------------------------------


def _stats(args: argparse.Namespace) -> int:
    reply = ask(args, "stats")
    if args.json:
        return _print_json(reply)
    for section in ("counters", "latency_ms"):
        print(f"{section}:")
        for k, v in sorted(reply[section].items()):
            print(f"  {k:<28} {v}")
    for name, values in sorted(reply.get("by_label", {}).items()):
        print(f"{name}:")
        for label, v in sorted(values.items()):
            print(f"  {label:<28} {v}")
    return 0


def _metrics(args: argparse.Namespace) -> int:
    reply = ask(args, "metrics")
    if args.json:
        return _print_json(reply)
    sys.stdout.write(reply["text"])
    return 0


# -- cull ------------------------------------------------------------------------------


def _cull_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--dry-run", action="store_true", help="what would go, in order, and why")
    g.add_argument("--now", action="store_true", help="run a cull pass now (root)")


def _cull(args: argparse.Namespace) -> int:
    reply = ask(args, "cull_plan" if args.dry_run else "cull", timeout=600.0)
    if args.json:
        return _print_json(reply)
    for k, v in reply.items():
        if k != "decisions":
            print(f"{k}: {v}")
    for d in reply.get("decisions", []):
        print(f"  {d['outcome']:<10} {human_bytes(d['bytes']):>10}  {d['blob']}  ({d['reason']})")
    return 0


# -- prefetch --------------------------------------------------------------------------


def _prefetch_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    _blob_arg(p)
    p.add_argument(
        "range", nargs="?", default="", help="OFFSET:LENGTH in bytes (K/M/G suffixes), default all"
    )


def parse_range(text: str) -> tuple[int, int]:
    """``OFFSET:LENGTH``, ``OFFSET:`` or ``""`` (everything); sizes take K/M/G/T."""
    from cachefilesd_py.config.parse import parse_size

    if not text:
        return 0, 0
    off, sep, length = text.partition(":")
    if not sep:
        raise ValueError(f"range must be OFFSET:LENGTH, not {text!r}")
    return parse_size(off or "0"), parse_size(length) if length else 0


def _bar(fields: Mapping[str, Any]) -> None:
    total = max(1, int(fields.get("total", 1)))
    done = int(fields.get("done", 0))
    width = 40
    filled = width * done // total
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {100 * done // total:3d}% "
        f"{human_bytes(done)}/{human_bytes(total)}"
    )
    sys.stderr.flush()


def ask_with_bar(args: argparse.Namespace, op: str, **kwargs: Any) -> Any:
    """``op``, long-running: its progress lines drawn as a bar on a terminal."""
    show = None if args.json or not sys.stderr.isatty() else _bar
    try:
        return ask(args, op, timeout=3600.0, on_progress=show, **kwargs)
    finally:
        if show is not None:
            sys.stderr.write("\n")


def _prefetch(args: argparse.Namespace) -> int:
    try:
        offset, length = parse_range(args.range)
    except ValueError as exc:
        print(f"cachefilesctl: {exc}", file=sys.stderr)
        return 2
    began = time.monotonic()
    reply = ask_with_bar(args, "prefetch", blob=args.blob, offset=offset, length=length)
    if args.json:
        return _print_json(reply)
    print(
        f"{reply['blob']}: {human_bytes(reply['length'])} from {reply['offset']} in "
        f"{time.monotonic() - began:.1f} s; now {reply['present_pct']:.1f}% present"
    )
    return 0


# -- pins ------------------------------------------------------------------------------


def _pin_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    action = p.add_argument(
        "blob",
        metavar="TARGET",
        help="a blob as 'blobs' lists it (volume/cookie), or a path on an EROFS mount",
    )
    action.completer = _blob_names  # type: ignore[attr-defined]
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--image",
        action="store_true",
        help="the blob is an EROFS image's primary blob: pin the image with its extra "
        "blobs, metadata first",
    )
    g.add_argument("--path", metavar="PATH", help="only the chunks behind PATH inside the image")


def pin_target(
    args: argparse.Namespace, status: Callable[[], Mapping[str, Any]] | None = None
) -> tuple[str, str]:
    """``(blob, path inside the image)`` of ``pin``'s arguments: a path on this host
    is looked up in the mount table (``control/mounts.py``); a file-backed EROFS mount
    (fanotify mode) by its mount point in the images ``status()`` lists."""
    if args.blob.startswith("/"):
        from cachefilesd_py.control.mounts import image_path_of

        def served() -> dict[str, str]:
            images = status().get("images", []) if status is not None else []
            return {
                os.path.realpath(i["mountpoint"]): i["blobs"][0]
                for i in images
                if i.get("mounted") and i.get("blobs")
            }

        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return image_path_of(f.read(), os.path.realpath(args.blob), served)
    return args.blob, "/" if args.image else (args.path or "")


def _pin(args: argparse.Namespace) -> int:
    try:
        blob, path = pin_target(args, lambda: ask(args, "status"))
    except (ValueError, OSError) as exc:
        print(f"cachefilesctl: {exc}", file=sys.stderr)
        return 2
    began = time.monotonic()
    reply = ask_with_bar(args, "pin", blob=blob, path=path)
    if args.json:
        return _print_json(reply)
    where = f" {reply['path']}" if reply["path"] else ""
    print(
        f"{reply['blob']}{where}: pinned; {human_bytes(reply['bytes'])} preloaded in "
        f"{time.monotonic() - began:.1f} s"
    )
    for b in reply["blobs"]:
        state = (
            f"{b['present_pct']:.1f}% present (through its {b['via']})"
            if b["preloaded"]
            else b["note"]
        )
        print(f"  {b['blob']}  {human_bytes(b['size'])}  {state}")
    return 0


def _unpin(args: argparse.Namespace) -> int:
    reply = ask(args, "unpin", blob=args.blob)
    if args.json:
        return _print_json(reply)
    note = " (a config pin line still matches it)" if reply["config_pin_still_holds"] else ""
    print(f"{reply['blob']}: unpinned{note}")
    return 0


def _pins(args: argparse.Namespace) -> int:
    reply = ask(args, "pins")
    if args.json:
        return _print_json(reply)
    rows = [("BLOB", "PIN", "SIZE", "PRESENT")]
    for p in reply["pins"]:
        pct = p.get("present_pct")
        rows.append(
            (p["blob"], p["source"], human_bytes(p["size"]), "-" if pct is None else f"{pct:.1f}%")
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(
        f"pinned by cachefilesctl: {human_bytes(reply['cli_total_bytes'])} "
        f"(cap: pin_max_share {reply['pin_max_share']}%)"
    )
    return 0


# -- offline policy --------------------------------------------------------------------


def _offline_policy_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "words",
        nargs="+",
        metavar="[PATTERN] error|wait CAP",
        help="a <volume>/<cookie> glob (none: the default), then 'error' or 'wait CAP' "
        "(CAP: 90, 90s, 5m, 1h)",
    )


def _offline_policy(args: argparse.Namespace) -> int:
    words = list(args.words)
    pattern = words.pop(0) if words[0] not in ("error", "wait") else ""
    reply = ask(args, "offline_policy", pattern=pattern, policy=" ".join(words))
    if args.json:
        return _print_json(reply)
    print(f"{reply['pattern'] or 'default'}: {reply['policy']}")
    return 0


# -- conflicts -------------------------------------------------------------------------


def _conflicts(args: argparse.Namespace) -> int:
    reply = ask(args, "conflicts")
    if args.json:
        return _print_json(reply)
    rows = [("BLOB", "STATE", "CACHED", "UPSTREAM", "SINCE", "OPEN")]
    for c in reply["conflicts"]:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c["since"]))
        rows.append(
            (
                c["blob"],
                c["resolution"],
                c["cached"],
                c["upstream"],
                since,
                "yes" if c["open"] else "no",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print(
        f"{reply['needing_attention']} needing attention (cachefilesctl resolve BLOB keep|refetch)"
    )
    return 0


def _resolve_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("blob", help="<volume key>/<cookie key>, as 'conflicts' lists it")
    p.add_argument(
        "how",
        choices=("keep", "refetch"),
        help="keep: serve the cached version on; refetch: take the origin's version at "
        "the blob's next OPEN",
    )


def _resolve(args: argparse.Namespace) -> int:
    reply = ask(args, "resolve", blob=args.blob, how=args.how)
    if args.json:
        return _print_json(reply)
    print(f"{reply['blob']}: {reply['resolution']} ({reply['note']})")
    return 0


# -- reload ----------------------------------------------------------------------------


def _reload(args: argparse.Namespace) -> int:
    reply = ask(args, "reload")
    if args.json:
        return _print_json(reply)
    print(f"changed:       {', '.join(reply['changed']) or 'nothing'}")
    print(f"applied:       {', '.join(reply['applied']) or 'nothing'}")
    print(f"needs restart: {', '.join(reply['needs_restart']) or 'nothing'}")
    return 0


# -- credentials -----------------------------------------------------------------------


def _credentials_args(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument(
        "action",
        choices=("reload",),
        help="reload: re-read the source_headers files and apply them to every HTTP "
        "source, open blobs' included (root only)",
    )


def _credentials(args: argparse.Namespace) -> int:
    reply = ask(args, "credentials_reload")
    if args.json:
        return _print_json(reply)
    for rule in reply["rules"]:
        print(
            f"reloaded      {rule['pattern']}: {rule['file']} ({rule['headers'] or 'no headers'})"
        )
    if not reply["rules"]:
        print("reloaded      no source_headers rules")
    if reply["cleared"]:
        print(f"cleared       rejected credentials of {', '.join(reply['cleared'])}")
    return 0


def _completion_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("shell", choices=("bash", "zsh", "fish"))


def _completion(args: argparse.Namespace) -> int:
    """The shell code that completes cachefilesctl (argcomplete's)."""
    from argcomplete.shell_integration import shellcode

    sys.stdout.write(shellcode(["cachefilesctl"], shell=args.shell))
    return 0


register(
    "status", "the daemon: mode, space against limits, objects, uptime", _common, run_live(_status)
)
register(
    "blobs",
    "open blobs: size, present %%, chunk size, source, pinned",
    _blobs_args,
    run_live(_blobs),
)
register("show", "a blob's presence map in the terminal", _show_args, run_live(_show))
register(
    "verify",
    "check presence bitmaps against cache files and sources",
    _verify_args,
    run_live(_verify),
)
register("stats", "counters and latency percentiles", _common, run_live(_stats))
register("metrics", "the Prometheus metrics text", _common, run_live(_metrics))
register(
    "cull",
    "what a cull pass would remove (--dry-run), or run one (--now)",
    _cull_args,
    run_live(_cull),
)
register(
    "prefetch",
    "fetch a blob (or a range of it) ahead, with progress",
    _prefetch_args,
    run_live(_prefetch),
)
register(
    "pin",
    "pin a blob (never culled, kept across restarts) and preload it, with progress",
    _pin_args,
    run_live(_pin),
)
register("unpin", "drop a pin made by 'pin'", _pin_args, run_live(_unpin))
register("pins", "the pins: blob, cli or config, size, present %%", _common, run_live(_pins))
register(
    "offline-policy",
    "what a READ of missing bytes does while its source is offline: error, or wait CAP",
    _offline_policy_args,
    run_live(_offline_policy),
)
register(
    "conflicts",
    "blobs whose origin changed while cached, with both versions",
    _common,
    run_live(_conflicts),
)
register(
    "resolve",
    "end a conflict: keep the cached version, or refetch the origin's",
    _resolve_args,
    run_live(_resolve),
)
register("reload", "re-read the configuration; report what changed", _common, run_live(_reload))
register(
    "credentials",
    "reload: re-read the source_headers files, for open blobs too",
    _credentials_args,
    run_live(_credentials),
)
register(
    "completion", "print shell completion code (bash, zsh, fish)", _completion_args, _completion
)
