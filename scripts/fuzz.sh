#!/usr/bin/env bash
# Coverage-guided fuzzing of every parser of peer or file bytes: the targets
# of tests/fuzz/fuzz_targets.h under libFuzzer, ASan and UBSan (clang).
# CI runs the same targets with a seeded mutation driver (te_fuzz_tests);
# this is the longer search to run before a release or after touching a
# parser.
#   scripts/fuzz.sh                  every target, 60 s each
#   scripts/fuzz.sh 300 descriptor   one target, 300 s
# Inputs that crash land in build-fuzz/findings/<target>/; the corpus each
# run grows is kept in build-fuzz/corpus/<target>/ for the next run. Exits 1
# if any target crashed, timed out or ran out of memory.
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
ONLY=${2:-}
CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DTE_SANITIZE=address -DTE_LIBFUZZER=ON >/dev/null
cmake --build build-fuzz -j "$(nproc)" --target te_libfuzzer
BIN=build-fuzz/tests/te_libfuzzer
export ASAN_OPTIONS=detect_leaks=1:allow_user_segv_handler=0
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
failed=()
for t in $(TE_FUZZ_TARGET=list "$BIN"); do
  [ -n "$ONLY" ] && [ "$t" != "$ONLY" ] && continue
  mkdir -p "build-fuzz/corpus/$t" "build-fuzz/findings/$t"
  echo "== $t (${SECONDS_EACH} s)"
  # -timeout: one input over 10 s is a hang; -rss_limit_mb: a parser must
  # not allocate what a hostile size asks for.
  dirs=("build-fuzz/corpus/$t"); [ -d "tests/fuzz/corpus/$t" ] && dirs+=("tests/fuzz/corpus/$t")
  if ! TE_FUZZ_TARGET=$t TE_FUZZ_SEEDS_TO="build-fuzz/corpus/$t" "$BIN" -max_total_time="$SECONDS_EACH" \
      -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="build-fuzz/findings/$t/" \
      "${dirs[@]}" >"build-fuzz/findings/$t.log" 2>&1; then
    failed+=("$t")
    grep -m3 -E "ERROR|invariant|SUMMARY" "build-fuzz/findings/$t.log" || true
  fi
  grep -E "stat::number_of_executed_units|stat::new_units_added" "build-fuzz/findings/$t.log" | tr '\n' ' '
  echo
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: findings in ${failed[*]} (inputs and logs under build-fuzz/findings/)" >&2
  exit 1
fi
echo "fuzz: no findings"
