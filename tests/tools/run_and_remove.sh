#!/usr/bin/env bash
# Runs a command, then removes the files it was told to leave behind
# (a collector's region file and its .info), whatever the command's outcome.
# Usage: run_and_remove.sh FILE... -- COMMAND [ARGS...]
# Exits with the command's status.
set -u
files=()
while [[ $# -gt 0 && "$1" != "--" ]]; do files+=("$1"); shift; done
if [[ $# -lt 2 ]]; then
  echo "usage: $0 FILE... -- COMMAND [ARGS...]" >&2
  exit 2
fi
shift
rm -f -- "${files[@]}"
"$@"
rc=$?
rm -f -- "${files[@]}"
exit $rc
