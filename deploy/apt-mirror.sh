#!/usr/bin/env bash
# Print the Debian mirror that apt on this machine already uses, for debootstrap.
#
#   deploy/apt-mirror.sh [SUITE]
#
# Order: $DEBIAN_MIRROR if set (the override); else the first `URIs:` of a deb822 stanza in
# /etc/apt/sources.list.d/*.sources whose `Suites:` lists SUITE (or, failing that, the first
# `URIs:` of any `Types: deb` stanza); else the first `deb` line of /etc/apt/sources.list.
# The repository names no package host itself: the machine's own apt configuration is the
# source of truth. With neither, it exits 1 with one line naming DEBIAN_MIRROR.
#
# APT_SOURCES_DIR and APT_SOURCES_LIST replace the two standard paths (tests).
set -euo pipefail

suite=${1:-}
if [[ -n ${DEBIAN_MIRROR:-} ]]; then
    printf '%s\n' "$DEBIAN_MIRROR"
    exit 0
fi
dir=${APT_SOURCES_DIR:-/etc/apt/sources.list.d}
list=${APT_SOURCES_LIST:-/etc/apt/sources.list}

# deb822: stanzas are separated by blank lines; fields are `Name: value`; '#' lines are comments.
deb822() {
    local want=$1 f
    shopt -s nullglob
    for f in "$dir"/*.sources; do
        awk -v want="$want" '
            function flush() {
                if (types ~ /(^| )deb( |$)/ && uri != "" && enabled != "no" &&
                    (want == "" || (" " suites " ") ~ (" " want " "))) { print uri; found = 1; exit }
                types = ""; uri = ""; suites = ""; enabled = ""
            }
            /^[ \t]*#/ { next }
            /^[ \t]*$/ { flush(); next }
            tolower($1) == "types:"   { types = substr($0, index($0, ":") + 1); gsub(/^[ \t]+/, "", types) }
            tolower($1) == "uris:"    { uri = $2 }
            tolower($1) == "suites:"  { suites = substr($0, index($0, ":") + 1); gsub(/^[ \t]+/, "", suites) }
            tolower($1) == "enabled:" { enabled = tolower($2) }
            END { if (!found) flush() }
        ' "$f" | head -n 1
    done | head -n 1
}

mirror=""
if [[ -n $suite ]]; then
    mirror=$(deb822 "$suite")
fi
[[ -n $mirror ]] || mirror=$(deb822 "")
if [[ -z $mirror && -f $list ]]; then
    # `deb [opt=val ...] URI suite components`; skip comments and deb-src.
    mirror=$(awk '$1 == "deb" {
                      i = 2
                      if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
                      if (i <= NF) { print $i; exit }
                  }' "$list")
fi
if [[ -z $mirror ]]; then
    echo "apt-mirror: no Debian mirror in $dir/*.sources or $list; set DEBIAN_MIRROR" >&2
    exit 1
fi
printf '%s\n' "$mirror"
