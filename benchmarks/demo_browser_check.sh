#!/usr/bin/env bash
# Opens a demo's index.html in headless Chromium: checks every image loaded and keeps a screenshot.
#   bash benchmarks/demo_browser_check.sh [demo_out] [docs/demo_index.png]
set -euo pipefail
DIR="$(cd "${1:-demo_out}" && pwd)"
SHOT="${2:-docs/demo_index.png}"
case "$SHOT" in /*) ;; *) SHOT="$(pwd)/$SHOT" ;; esac
BROWSER="$(command -v chromium || command -v chromium-browser || true)"
[ -n "$BROWSER" ] || { echo "chromium not found (Debian: apt-get install chromium)"; exit 2; }
FLAGS=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run --disable-background-networking
       --disable-component-update --disable-sync --user-data-dir="$(mktemp -d)" --virtual-time-budget=10000)
DOM="$("$BROWSER" "${FLAGS[@]}" --dump-dom "file://$DIR/index.html" 2>/dev/null)"
IMAGES="$(grep -o 'data-images="[0-9]*"' <<<"$DOM" | grep -o '[0-9]*' || true)"
BROKEN="$(grep -o 'data-broken-images="[0-9]*"' <<<"$DOM" | grep -o '[0-9]*' || true)"
echo "images: ${IMAGES:-?}, broken: ${BROKEN:-?}"
[ -n "$IMAGES" ] && [ "$IMAGES" -gt 0 ] && [ "$BROKEN" = "0" ] || { echo "FAIL: the page did not render all its images"; exit 1; }
rm -f "$SHOT"
"$BROWSER" "${FLAGS[@]}" --window-size=1100,2400 --screenshot="$SHOT" "file://$DIR/index.html" 2>/dev/null
[ -s "$SHOT" ] || { echo "FAIL: no screenshot was written to $SHOT"; exit 1; }
echo "screenshot: $SHOT"
