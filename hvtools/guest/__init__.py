"""The guest side: the image (kernel + initramfs + agent) and the host client of its agent."""

from hvtools.guest.agent import AgentClient, ExecResult, wait_for_agent
from hvtools.guest.image import GuestImage, build_image, find_image

__all__ = [
    "AgentClient",
    "ExecResult",
    "GuestImage",
    "build_image",
    "find_image",
    "wait_for_agent",
]
