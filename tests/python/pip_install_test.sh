#!/usr/bin/env bash
# `pip install .` works offline (--no-build-isolation --no-index), and the
# installed package imports and runs a transfer without the build tree.
#   pip_install_test.sh PYTHON SCRATCH_DIR     (run from the repository root)
set -euo pipefail
PY=$1
DIR=$2
rm -rf "$DIR"
"$PY" -m pip install -q --no-build-isolation --no-index --no-deps --target "$DIR/site" . 2>&1 |
  grep -v "Running pip as the 'root' user" || true
cd "$DIR"
PYTHONPATH="$DIR/site" "$PY" - <<'PYEOF'
import os, sys
import numpy as np
import transfer_engine as te
assert te.__file__.startswith(os.environ["PYTHONPATH"]), te.__file__
assert os.path.exists(os.path.join(os.path.dirname(te.__file__), "_transfer_engine.pyi"))
a, b = te.Engine(), te.Engine()
src = np.arange(4096, dtype=np.uint8)
dst = np.zeros(4096, dtype=np.uint8)
rs, rd = a.register(src), b.register(dst)
remote = a.import_descriptor(rd.descriptor())
a.write(rs, remote, imm=1).wait(60)
b.wait_imm(1, 1, timeout=60)
assert (src == dst).all()
print("installed package:", te.__file__, "transfer verified")
PYEOF
