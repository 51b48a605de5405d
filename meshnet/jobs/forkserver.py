"""Imported by multiprocessing's forkserver as it starts (its preload), and by nothing
else: the forkserver and every worker it forks ignore the node's stop signals.

A SIGTERM or Ctrl-C sent to the node's whole process group (systemd, docker, a terminal)
reached the forkserver too, which died of it; the node then read every running worker's
end as a crash, and its jobs ended ``WorkerCrashed``. The node stops its workers itself,
after its drain. An ignored signal stays ignored in a forked child, and the forkserver
resets only SIGINT and SIGCHLD in its children (to what it found: ignored, here).
"""

import signal

for _stop in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_stop, signal.SIG_IGN)
