"""The errors `videoxl build` and `videoxl check` raise; each message names actual values and a fix."""

from __future__ import annotations


class EngineBuildError(RuntimeError):
    """An engine build was refused or failed; nothing was written to the output directory."""


class EngineMismatchError(RuntimeError):
    """The engines in a directory cannot be used by this process as they are: rebuild them."""


class GPUUnavailableError(RuntimeError):
    """The command runs engines and this machine has no usable NVIDIA GPU."""
