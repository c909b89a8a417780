"""Option values that the command line checks before it imports torch.

The commands' modules import torch; these constants do not, so that a bad option or output name
fails at once (exit code 2), without waiting seconds for the torch import.
"""

from __future__ import annotations

__all__ = ["BENCH_FORMATS", "DEFAULT_REPEATS", "DEMO_FILES", "IMAGE_FORMATS", "MAX_SIZE", "SUITES"]

# what demo writes into its --out folder
DEMO_FILES = ("results.json", "figure.png")
# bench --suite
SUITES = ("spatial", "dropblock", "family", "keyed")
# bench --repeats, by --quick
DEFAULT_REPEATS = {False: 15, True: 5}
# --out suffix -> format; a suffix that names a format decides it (a --format naming another is
# refused); without a suffix, --format or the default (bench: table; show: png)
BENCH_FORMATS = {".txt": "table", ".md": "markdown", ".markdown": "markdown", ".json": "json", ".csv": "csv"}
IMAGE_FORMATS = {".png": "png", ".pdf": "pdf", ".svg": "svg", ".jpg": "jpeg", ".jpeg": "jpeg"}
# show --size: the largest map side. A panel is about 260 pixels wide and shows 4 maps side by
# side, so a larger map has more elements than the image has pixels; and the 16 masks drawn at
# once, the 3-D volume and the chunks of the rate maps stay well under a gigabyte up to here.
MAX_SIZE = 512
