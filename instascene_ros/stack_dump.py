"""`kill -USR1 <pid>` prints every thread's Python stack to stderr and the process goes on.

For a process that seems stuck (a bag playback, a mapping run, a node on the robot): where it
waits, without stopping it or attaching a debugger. Registered by the CLI and by our nodes' main.
"""
from __future__ import annotations

import faulthandler
import signal


def dump_stacks_on_sigusr1() -> bool:
    """Register the dump (not on platforms without SIGUSR1); True when registered."""
    if not hasattr(signal, "SIGUSR1"):
        return False
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    return True
