"""What both frontends send before ``bind``, from the configuration.

``dir``, ``tag``, ``secctx``, the six thresholds in an order the kernel accepts, and
``debug``, one command per write (``kernel/commands.py`` builds them). The kernel turns
the thresholds into absolute numbers once, at ``bind``: changing them needs a restart.
"""

from __future__ import annotations

from cachefilesd_py.config.model import Config
from cachefilesd_py.errors import ConfigError
from cachefilesd_py.kernel import commands


def kernel_commands(cfg: Config) -> list[bytes]:
    """The commands before ``bind``; ConfigError for a value no command can carry."""
    assert cfg.dir is not None
    try:
        return commands.setup_commands(
            cfg.dir,
            tag=cfg.tag,
            secctx=cfg.secctx,
            thresholds=cfg.thresholds,
            debug=cfg.debug,
        )
    except ValueError as exc:
        raise ConfigError(f"cannot be sent to the kernel: {exc}") from None
