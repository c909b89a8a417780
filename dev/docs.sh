#!/usr/bin/env bash
# The documentation site (README, "Set up"); run from anywhere:
#   bash dev/docs.sh            # build it strictly into site/
#   bash dev/docs.sh --browser  # then open every page in headless chromium (dev/docs_test.py)
# It builds in .venv-models (torch 2.14.1, torchvision, timm: the example gallery runs
# examples/convert_timm.py, which needs timm), making it as dev/test.sh does when missing and
# adding the `docs` extra (mkdocs, mkdocs-material, mkdocstrings, playwright) when that is
# missing. `mkdocs build --strict` fails on any warning: a broken link or anchor, a page left out
# of the navigation, a missing API entry, a failing example (dev/docs_hooks.py).
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 NO_MKDOCS_2_WARNING=1
if [ ! -x .venv-models/bin/python ]; then
    python3 -m venv .venv-models
    .venv-models/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e ".[test,models,docs]"
fi
if ! .venv-models/bin/python -c "import mkdocs, material, mkdocstrings_handlers.python, playwright, timm" 2>/dev/null; then
    .venv-models/bin/pip install -q -e ".[models,docs]"
fi
.venv-models/bin/python -m mkdocs build --strict --clean --site-dir site
if [ "${1:-}" = "--browser" ]; then
    if [ ! -x /usr/bin/chromium ]; then
        # Debian's chromium; Playwright drives it (no `playwright install` download)
        SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
        $SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium
    fi
    .venv-models/bin/python dev/docs_test.py site
fi
