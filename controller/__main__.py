"""Entry point: environment → Config → logging → run; maps errors to exit codes."""

from __future__ import annotations

import os
import signal
import sys

import anyio

from controller.app import EXIT_CONFIG, run
from controller.config import Config, load_config
from controller.errors import ConfigError
from controller.logs import bind_context, configure_logging, get_logger


async def _main(config: Config) -> int:
    bind_context(session_id=config.session_id)
    get_logger("controller").info(
        "controller_starting",
        proxy_port=config.proxy.port,
        metrics_port=config.metrics_port,
        context=config.context is not None,
        persist=bool(config.context and config.context.persist),
        stop_timeout=config.shutdown.stop_timeout,
    )
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:

        async def shutdown_trigger() -> str:
            async for received in signals:
                return received.name
            return "signals_closed"

        code = await run(config, shutdown_trigger=shutdown_trigger, environ=os.environ)
        # Python restores default handlers while exiting; a late SIGTERM must not turn 0 into -15.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    return code


def main() -> int:
    """Run the controller; return its exit code (2 for a bad configuration)."""
    configure_logging("INFO")
    try:
        config = load_config(os.environ)
    except ConfigError as exc:
        get_logger("controller").error("config_invalid", problems=exc.problems)
        return EXIT_CONFIG
    configure_logging(config.log_level)
    return anyio.run(_main, config)


if __name__ == "__main__":
    sys.exit(main())
