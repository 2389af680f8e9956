#!/bin/sh
# Install what bench/run.py needs on top of ../install.sh (Debian 12, as root):
# the peers it measures dkr against (podman, skopeo, umoci), the limit rows'
# tools (curl, pigz, GNU tar), btrfs-progs for the loop-mounted destination,
# and matplotlib in the venv for the chart (optional: run.py skips the chart
# with a note when it cannot import it).
set -eu
cd "$(dirname "$0")/.."
./install.sh
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends \
    podman skopeo umoci curl pigz tar btrfs-progs util-linux >/dev/null
.venv/bin/pip install -q --disable-pip-version-check 'matplotlib>=3.7' \
    || echo "bench/install.sh: matplotlib not installed; run.py will skip the chart" >&2
echo "bench tools: $(podman --version), $(skopeo --version), $(umoci --version)"
