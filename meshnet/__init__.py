"""MeshNet: run AI jobs on devices anywhere, directly or through a relay."""

from meshnet.client import MeshClient
from meshnet.errors import (
    JobCancelled,
    JobError,
    JobFailed,
    JobRefused,
    JobTimedOut,
    MeshError,
    NodeUnreachable,
    PeerLost,
)
from meshnet.executor import MeshExecutor

__version__ = "0.1.0"

__all__ = [
    "MeshClient",
    "MeshExecutor",
    "MeshError",
    "JobError",
    "JobFailed",
    "JobRefused",
    "JobTimedOut",
    "JobCancelled",
    "PeerLost",
    "NodeUnreachable",
    "__version__",
]
