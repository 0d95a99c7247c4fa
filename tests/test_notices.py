"""`import diffseg` silences transformers' torchvision notice, and nothing else."""

from __future__ import annotations

import importlib.util
import logging
import subprocess
import sys

import pytest

import diffseg
from diffseg.quiet import TORCHVISION_NOTICE, TRANSFORMERS_IMPORT_LOGGER

NOTICE = (
    "`CLIPImageProcessor` requires torchvision (not installed); falling back to "
    "`CLIPImageProcessorPil` for backward compatibility."
)


class _Keep(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_the_filter_drops_that_notice_only():
    assert TORCHVISION_NOTICE in NOTICE
    logger = logging.getLogger(TRANSFORMERS_IMPORT_LOGGER)
    keep = _Keep()
    logger.addHandler(keep)
    try:
        logger.warning(NOTICE)
        logger.warning("`Foo` requires the bar library, which is not installed.")
    finally:
        logger.removeHandler(keep)
    assert keep.messages == ["`Foo` requires the bar library, which is not installed."]
    diffseg.quiet.silence_known_notices()  # idempotent
    assert sum(isinstance(f, diffseg.quiet.DropMessages) for f in logger.filters) == 1


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is not None, reason="torchvision: no notice"
)
def test_transformers_notice_is_silenced_after_import_diffseg():
    """The real notice: shown for a class resolved before `import diffseg`, not after."""
    code = (
        "import logging\n"
        "from transformers import SiglipImageProcessor\n"
        "import diffseg\n"
        "from transformers import CLIPImageProcessor\n"
        f"logging.getLogger({TRANSFORMERS_IMPORT_LOGGER!r}).warning('another notice')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "`SiglipImageProcessor` requires torchvision" in done.stderr  # before: shown
    assert "CLIPImageProcessor` requires torchvision" not in done.stderr  # after: silenced
    assert "another notice" in done.stderr  # the logger's other records still show
