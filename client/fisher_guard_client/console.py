"""Running a command whose output may go to a reader that leaves early (`fisher-guard gate --json | head`)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

# The shell's status of a process that SIGPIPE (13) ended, as `yes | head` leaves it: 128 + 13. Python ignores
# SIGPIPE and raises BrokenPipeError instead; a command that meets it exits with this status and says nothing.
CLOSED_PIPE_EXIT = 141

Handler = Callable[[argparse.Namespace], int]


def run_handler(handler: Handler, args: argparse.Namespace) -> int:
    """The handler's exit status; CLOSED_PIPE_EXIT, quietly, when stdout's reader has gone (its buffered rest is
    dropped, so that the interpreter's flush at exit has nothing to complain about)."""
    try:
        status = int(handler(args) or 0)
        sys.stdout.flush()  # inside the try: what is still buffered meets the closed pipe here
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return CLOSED_PIPE_EXIT
    return status
