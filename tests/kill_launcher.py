"""``python tests/kill_launcher.py JOB:STEP:before|after serve ...``: rebuildd's own command
line, with a step observer that SIGKILLs the process at one step boundary, so the
fault-injection suite can prove restart recovery at every boundary.

The hook lives here, in the test suite: rebuildd only takes an observer from a program that
embeds its CLI (``cli.Hooks``); no setting or variable of the daemon can arm it.
"""

from __future__ import annotations

import os
import signal
import sys

from rebuildd.cli import Hooks, main


class KillAt:
    """SIGKILL this process at one step boundary (``JOB:STEP:before|after``)."""

    def __init__(self, spec: str) -> None:
        self.spec = spec

    async def _check(self, job: str, step: str, phase: str) -> None:
        if f"{job}:{step}:{phase}" == self.spec:
            os.kill(os.getpid(), signal.SIGKILL)

    async def before_step(self, job: str, step: str, server_id: str) -> None:
        await self._check(job, step, "before")

    async def after_step(self, job: str, step: str, server_id: str) -> None:
        await self._check(job, step, "after")


if __name__ == "__main__":
    main(sys.argv[2:], prog_name="rebuildd", obj=Hooks(observer=KillAt(sys.argv[1])))
