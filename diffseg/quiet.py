"""Known harmless library notices, silenced at ``import diffseg`` (and only those).

transformers (5.x) logs, once per class, that ``CLIPImageProcessor`` / ``SiglipImageProcessor``
"require torchvision (not installed)" and fall back to their PIL versions whenever diffusers'
pipelines touch them. diffseg never uses an image processor, so every run printed two lines that
ask the user to install a package nothing needs. A filter on that one logger drops records with
that one message; every other record of the logger, and every other warning, is kept.
"""

from __future__ import annotations

import logging

__all__ = ["TORCHVISION_NOTICE", "silence_known_notices"]

#: The logger transformers' lazy-import fallback writes to, and the text its notice contains.
TRANSFORMERS_IMPORT_LOGGER = "transformers.utils.import_utils"
TORCHVISION_NOTICE = "requires torchvision (not installed); falling back to"


class DropMessages(logging.Filter):
    """Drops the records whose message contains one of ``fragments``."""

    def __init__(self, *fragments: str) -> None:
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(fragment in message for fragment in self.fragments)


def silence_known_notices() -> None:
    """Install the filter (once; transformers need not be imported yet)."""
    logger = logging.getLogger(TRANSFORMERS_IMPORT_LOGGER)
    if not any(isinstance(f, DropMessages) for f in logger.filters):
        logger.addFilter(DropMessages(TORCHVISION_NOTICE))
