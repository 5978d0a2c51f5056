#!/usr/bin/env python3
"""Fails when an include points up the room order, or a provider header
leaks out of its room. Run by .ci/run and scripts/test.sh.

Rooms, lowest first (a room includes its own headers and lower rooms' only):
    base -> nic -> transfer -> {telemetry, moe, weightsync, kvcache} -> tools
         -> registry ---------->                                     -> python
registry/ (the Redis client) needs only base/; the planes may use it.
The four data planes do not include each other. libfabric headers
(<rdma/fi_*.h>) appear only in nic/fabric/, verbs headers (<infiniband/*>)
only in nic/verbs/. tests/ and baselines/ (provider loops that must not
share the engine's code) may include anything.
"""

import os
import re
import subprocess
import sys

RANK = {"base": 0, "nic": 1, "registry": 1, "transfer": 2, "telemetry": 3, "moe": 3, "weightsync": 3, "kvcache": 3,
        "tools": 4, "python": 4}
PROVIDER_HEADERS = [(re.compile(r"#\s*include\s*<rdma/fi"), "nic/fabric/", "libfabric"),
                    (re.compile(r"#\s*include\s*<infiniband/"), "nic/verbs/", "verbs")]
QUOTED = re.compile(r'#\s*include\s*"([a-z_]+)/')


def main() -> int:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    files = subprocess.run(["git", "ls-files", "*.h", "*.cc", "*.cu"], cwd=root, capture_output=True, text=True,
                           check=True).stdout.split()
    bad = []
    for path in files:
        room = path.split("/", 1)[0]
        if room not in RANK:  # tests/, examples/, baselines/: free to include anything
            continue
        with open(os.path.join(root, path), errors="replace") as f:
            for n, line in enumerate(f, 1):
                m = QUOTED.match(line.strip())
                if m:
                    target = m.group(1)
                    if target in RANK and target != room:
                        if RANK[target] > RANK[room] or (RANK[target] == RANK[room]):
                            bad.append(f"{path}:{n}: {room}/ includes {target}/ (rooms point down only: "
                                       f"base -> nic -> transfer -> planes -> tools, python)")
                for pattern, home, what in PROVIDER_HEADERS:
                    if pattern.match(line.strip()) and not path.startswith(home):
                        bad.append(f"{path}:{n}: {what} header outside {home}")
    for b in bad:
        print(b, file=sys.stderr)
    if bad:
        print(f"check_layering: {len(bad)} violation(s)", file=sys.stderr)
        return 1
    print(f"check_layering: {len(files)} files, includes point down only")
    return 0


if __name__ == "__main__":
    sys.exit(main())
