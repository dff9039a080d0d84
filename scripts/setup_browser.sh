#!/usr/bin/env bash
# Headless Chromium and its WebDriver from Debian's packages, for the browser tests of the page
# (tests/ui/test_browser.py, Selenium). Does nothing when both are installed; otherwise installs
# them non-interactively with apt-get (as root, or through sudo).
set -euo pipefail
if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "[setup_browser] installing chromium and chromium-driver (apt-get)" >&2
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q
$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends chromium chromium-driver
chromium --version >&2
