#!/usr/bin/env bash
# Executes Polyglot notebooks headless with dotnet-repl and fails when any cell fails.
#
#   bash notebooks/run-notebooks.sh [notebook.ipynb ...]     (default: every notebooks/*.ipynb)
#
# Called by `dotnet fsi build.fsx notebooks` after the solution was built in Release: the notebooks `#r` the
# Release output. For each notebook it writes the executed copy to notebooks/out/<name>.ipynb and the tool's
# console output to notebooks/out/<name>.log, prints one line "ok|FAILED <notebook> (<seconds> s)" and, for a
# failure, the error text of every failing cell (dotnet-repl only exits 2; the errors are in the output notebook).
# Exit code: 0 when every notebook ran without error, 1 when one failed, 3 when the set-up failed.
#
# Why a private copy of dotnet-repl: dotnet-repl 0.3.259 (version from .config/dotnet-tools.json) ships
# FSharp.Core 10.0, while Vct.Core and Plotly.NET 6 reference FSharp.Core 10.1 and fail to load in it ("The located
# assembly's manifest definition does not match"). The script copies the tool out of the NuGet cache (where
# `dotnet tool restore` puts it; it runs that restore, and falls back to `dotnet tool install --tool-path`) into
# artifacts/notebook-host/ and replaces its FSharp.Core.dll with the solution's (version from
# Directory.Packages.props, file from the NuGet cache, restored by the solution's build). FSharp.Core is backward
# compatible, so the tool and its F# compiler run on the newer one. The NuGet cache itself is not modified.
#
# The kernel starts in notebooks/ (as in VS Code, where it starts in the notebook's folder), so relative `#r`
# paths in notebooks resolve against notebooks/ also for notebooks given from elsewhere.
#
# Environment: VCT_NOTEBOOK_TIMEOUT (seconds per notebook, default 1500: the first notebook that needs the tiny model trains it).
set -uo pipefail

caller_dir="$PWD"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 3
export DOTNET_CLI_TELEMETRY_OPTOUT=1 DOTNET_INTERACTIVE_CLI_TELEMETRY_OPTOUT=1 DOTNET_NOLOGO=1
timeout_s="${VCT_NOTEBOOK_TIMEOUT:-1500}"

die() { echo "run-notebooks: $*" >&2; exit 3; }

command -v python3 >/dev/null || die "python3 is required (to read .config/dotnet-tools.json and the output notebooks)"

# ---- versions -------------------------------------------------------------------------------------------------
repl_version="$(python3 -c '
import json, sys
print(json.load(open(".config/dotnet-tools.json"))["tools"]["dotnet-repl"]["version"])' 2>/dev/null)" \
    || die "dotnet-repl is not in the local tool manifest .config/dotnet-tools.json"
fscore_version="$(sed -n 's/.*PackageVersion Include="FSharp.Core" Version="\([^"]*\)".*/\1/p' Directory.Packages.props | head -n1)"
[ -n "$fscore_version" ] || die "no FSharp.Core version in Directory.Packages.props"

packages="${NUGET_PACKAGES:-}"
if [ -z "$packages" ]; then
    packages="$(dotnet nuget locals global-packages --list 2>/dev/null | sed -n 's/^global-packages: *//p')"
fi
packages="${packages%/}"
[ -n "$packages" ] || die "cannot find the NuGet global packages folder ('dotnet nuget locals global-packages --list')"

fscore="$packages/fsharp.core/$fscore_version/lib/netstandard2.1/FSharp.Core.dll"
[ -f "$fscore" ] || die "$fscore not found. Restore the solution first: dotnet restore Vct.sln (or dotnet build Vct.sln -c Release)."

# ---- the private copy of dotnet-repl with the newer FSharp.Core ------------------------------------------------
host="$root/artifacts/notebook-host/dotnet-repl-$repl_version-fsharp.core-$fscore_version"
if [ ! -f "$host/.complete" ]; then
    echo "run-notebooks: preparing $host" >&2
    mkdir -p "$root/artifacts/notebook-host" || die "cannot create artifacts/notebook-host"
    work="$(mktemp -d "$root/artifacts/notebook-host/.tmp.XXXXXX")" || die "cannot create a temporary folder"
    trap 'rm -rf "$work"' EXIT
    # The tool's files: where `dotnet tool restore` puts them (the NuGet cache; works offline once restored),
    # else from a `dotnet tool install --tool-path` of the manifest's version.
    find_tool() { ls -d "$1"/tools/net*/any 2>/dev/null | sort -V | tail -n1; }
    tool_dir="$(find_tool "$packages/dotnet-repl/$repl_version")"
    if [ ! -f "$tool_dir/dotnet-repl.dll" ]; then
        echo "run-notebooks: dotnet-repl $repl_version is not in $packages; running 'dotnet tool restore'" >&2
        dotnet tool restore >&2
        tool_dir="$(find_tool "$packages/dotnet-repl/$repl_version")"
    fi
    if [ ! -f "$tool_dir/dotnet-repl.dll" ]; then
        echo "run-notebooks: installing dotnet-repl $repl_version with --tool-path" >&2
        dotnet tool install dotnet-repl --version "$repl_version" --tool-path "$work/install" >&2
        tool_dir="$(find_tool "$work/install/.store/dotnet-repl/$repl_version/dotnet-repl/$repl_version")"
    fi
    [ -f "$tool_dir/dotnet-repl.dll" ] \
        || die "dotnet-repl $repl_version (pinned in .config/dotnet-tools.json) cannot be found or installed. Run 'dotnet tool restore' in $root (needs NuGet access once)."
    # Hard links where possible (same file system), else a copy. The replaced file is removed first, so the
    # NuGet cache's own FSharp.Core.dll is never written to.
    copy="$work/host"
    mkdir -p "$copy" && { cp -al "$tool_dir/." "$copy/" 2>/dev/null || { rm -rf "$copy" && mkdir -p "$copy" && cp -a "$tool_dir/." "$copy/"; }; } \
        || die "cannot copy $tool_dir"
    rm -f "$copy/FSharp.Core.dll" && cp "$fscore" "$copy/FSharp.Core.dll" || die "cannot replace FSharp.Core.dll"
    echo "dotnet-repl $repl_version from $tool_dir; FSharp.Core.dll from $fscore" > "$copy/.complete"
    rm -rf "$host"
    mv "$copy" "$host" || die "cannot move the copy to $host"
    rm -rf "$work"
    trap - EXIT
fi

# ---- run ----------------------------------------------------------------------------------------------------------
if [ $# -gt 0 ]; then
    notebooks=()
    for nb in "$@"; do
        case "$nb" in /*) notebooks+=("$nb") ;; *) notebooks+=("$caller_dir/$nb") ;; esac
    done
else
    # A full run starts from no chart copies (artifacts/notebooks/charts/, README's pictures), so none is stale.
    rm -rf "$root/artifacts/notebooks/charts"
    shopt -s nullglob
    notebooks=("$root"/notebooks/*.ipynb)
    shopt -u nullglob
    [ ${#notebooks[@]} -gt 0 ] || die "no notebooks/*.ipynb"
fi

[ -f "$root/src/Vct.Cli/bin/Release/net10.0/Vct.Core.dll" ] \
    || echo "run-notebooks: warning: no Release build (src/Vct.Cli/bin/Release); the notebooks need 'dotnet build Vct.sln -c Release' first" >&2

out_dir="$root/notebooks/out"
mkdir -p "$out_dir" || die "cannot create $out_dir"

# Prints the errors recorded in an executed notebook; exits 1 when there is one.
print_errors() {
    python3 - "$1" <<'PY'
import json, sys
try:
    nb = json.load(open(sys.argv[1], encoding="utf-8"))
except Exception as e:
    print(f"    cannot read the output notebook: {e}")
    sys.exit(1)
found = False
for n, cell in enumerate(nb.get("cells", []), 1):
    for out in cell.get("outputs", []):
        if out.get("output_type") != "error":
            continue
        found = True
        src = "".join(cell.get("source", [])).strip().splitlines()
        print(f"    cell {n}: {src[0] if src else ''}")
        text = f"{out.get('ename', 'Error')}: {out.get('evalue', '')}"
        if not str(out.get("evalue", "")).strip():  # .NET puts the whole exception into evalue
            text += "\n" + "\n".join(out.get("traceback") or [])
        lines = text.splitlines()
        for line in lines[:40]:
            print(f"      {line}")
        if len(lines) > 40:
            print(f"      ... ({len(lines) - 40} more lines)")
sys.exit(1 if found else 0)
PY
}

failed=0
for nb in "${notebooks[@]}"; do
    if [ ! -f "$nb" ]; then
        echo "FAILED ${nb#"$root"/} (not found)"
        failed=1
        continue
    fi
    nb_abs="$(cd "$(dirname "$nb")" && pwd)/$(basename "$nb")"
    name="$(basename "$nb" .ipynb)"
    out="$out_dir/$name.ipynb"
    log="$out_dir/$name.log"
    rm -f "$out"
    start=$(date +%s.%N)
    (cd "$root/notebooks" && timeout "$timeout_s" dotnet "$host/dotnet-repl.dll" --run "$nb_abs" --exit-after-run \
        --output-format ipynb --output-path "$out" --default-kernel fsharp) </dev/null >"$log" 2>&1
    rc=$?
    secs=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
    rel="${nb_abs#"$root"/}"
    if [ -f "$out" ]; then
        errors="$(print_errors "$out")"
        has_errors=$?
    else
        errors="    no output notebook was written"
        has_errors=1
    fi
    if [ $rc -eq 0 ] && [ $has_errors -eq 0 ]; then
        echo "ok     $rel (${secs} s)"
    else
        failed=1
        case $rc in
            0) why="" ;;
            124) why=", timed out after ${timeout_s} s" ;;
            *) why=", dotnet-repl exit code $rc" ;;
        esac
        echo "FAILED $rel (${secs} s$why) -> ${out#"$root"/}"
        [ -n "$errors" ] && echo "$errors"
        if [ $has_errors -eq 0 ] || [ ! -f "$out" ]; then
            echo "    last lines of ${log#"$root"/}:"
            tail -n 20 "$log" | sed 's/^/      /'
        fi
    fi
done
exit $failed
