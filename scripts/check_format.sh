#!/usr/bin/env bash
# Fails when a C++/CUDA file differs from .clang-format (clang-format from
# Debian). To fix: clang-format -i $(git ls-files '*.h' '*.cc' '*.cu')
set -euo pipefail
cd "$(dirname "$0")/.."
mapfile -t files < <(git ls-files '*.h' '*.cc' '*.cu')
if clang-format --dry-run --Werror "${files[@]}" 2>/tmp/te-format.$$; then
  echo "check_format: ${#files[@]} files match .clang-format"
  rm -f /tmp/te-format.$$
else
  grep -E "^[^ ].*(warning|error):" /tmp/te-format.$$ | cut -d: -f1 | sort -u | sed 's/^/  needs formatting: /' >&2
  rm -f /tmp/te-format.$$
  echo "check_format: run clang-format -i \$(git ls-files '*.h' '*.cc' '*.cu')" >&2
  exit 1
fi
