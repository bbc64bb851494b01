#!/usr/bin/env bash
# System packages the tests need that pip can't provide: Debian's Chromium for the web console's
# browser tests (Playwright drives /usr/bin/chromium; it never downloads a browser). Installs it
# as root (or through passwordless sudo) when missing; otherwise says exactly what to run.
set -euo pipefail

if [ -x /usr/bin/chromium ]; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "make test: the browser tests need Chromium at /usr/bin/chromium, and this machine has" \
         "no apt-get to install it. Install Chromium with your package manager (or link it to" \
         "/usr/bin/chromium), then run make test again." >&2
    exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO=(sudo -n)
else
    echo "make test: the browser tests need Debian's chromium package, which needs root to" \
         "install: run 'sudo apt-get install -y chromium' once, then make test again." >&2
    exit 1
fi
echo "==> installing Debian's chromium for the browser tests (once)" >&2
APT=("${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get)
"${APT[@]}" install -y --no-install-recommends chromium \
    || { "${APT[@]}" update && "${APT[@]}" install -y --no-install-recommends chromium; }
