#!/usr/bin/env bash
# Installs what the browser tests (tests/browser/) need, when it is missing:
#   - Debian's chromium (/usr/bin/chromium), run headless by chromiumoxide;
#   - axe-core from npm, into target/browser/ (the tests inject axe.min.js into each page).
# Idempotent and quiet when everything is there already. Needs root for apt-get.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
axe_version="4.14.1"   # pinned: the accessibility rules the tests run are this version's
prefix="$root/target/browser"

say() {
    echo "browser-deps: $*" >&2
}

if [ ! -x /usr/bin/chromium ]; then
    say "installing Debian's chromium"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
fi
say "$(/usr/bin/chromium --version 2>/dev/null || echo 'chromium: not runnable')"

if [ "$(node -p "require('$prefix/node_modules/axe-core/package.json').version" 2>/dev/null)" != "$axe_version" ]; then
    say "installing axe-core@$axe_version into target/browser"
    mkdir -p "$prefix"
    npm install --silent --no-audit --no-fund --prefix "$prefix" "axe-core@$axe_version" >/dev/null
fi
say "axe-core $(node -p "require('$prefix/node_modules/axe-core/package.json').version")"
