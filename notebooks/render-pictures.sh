#!/usr/bin/env bash
# Renders README's notebook pictures from the chart copies the notebooks leave in artifacts/notebooks/charts/
# (run `dotnet fsi build.fsx notebooks` first) with Debian's chromium, headless:
#
#   bash notebooks/render-pictures.sh        -> docs/images/notebooks/<notebook>.png
#
# One chart per notebook, chosen below; each is a standalone HTML page with plotly.js inlined, so no network is used.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
charts="$root/artifacts/notebooks/charts"
out="$root/docs/images/notebooks"
browser="$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)"
[ -n "$browser" ] || { echo "render-pictures: chromium is needed (Debian: apt-get install chromium)" >&2; exit 3; }
mkdir -p "$out"
# notebook chart-number width height
while read -r nb k w h; do
    page="$charts/$nb-$k.html"
    [ -f "$page" ] || { echo "render-pictures: $page is missing (run the notebooks first)" >&2; exit 1; }
    "$browser" --headless --disable-gpu --no-sandbox --hide-scrollbars --virtual-time-budget=5000 \
        --window-size="$w,$h" --screenshot="$out/$nb.png" "file://$page" >/dev/null 2>&1
    echo "$out/$nb.png"
done <<'LIST'
01-model-tour 1 840 430
02-what-the-queries-see 2 920 280
03-train-and-evaluate 1 840 430
04-audio-front-end 2 1120 330
05-segment-a-video 1 1020 490
06-csharp 1 740 390
LIST
