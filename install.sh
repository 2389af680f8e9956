#!/bin/sh
# Install dkr, with what its demo and tests use, on Debian 12 (run as root).
# Leaves a virtual environment in .venv beside this file.
set -eu
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    python3 python3-venv python3-dev gcc libc6-dev libbtrfsutil-dev \
    btrfs-progs tar coreutils util-linux ca-certificates openssl \
    docker-registry skopeo umoci pigz zstd gnupg podman erofs-utils systemd-container >/dev/null
# dkr obeys the host's containers-policy.json(5) as podman does, and refuses to
# pull without one: give a host that has none Debian's default (accept anything).
if [ ! -e /etc/containers/policy.json ]; then
    mkdir -p /etc/containers
    printf '{\n    "default": [\n        {\n            "type": "insecureAcceptAnything"\n        }\n    ]\n}\n' \
        >/etc/containers/policy.json
fi
[ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check --upgrade pip
.venv/bin/pip install -q --disable-pip-version-check -e '.[test,btrfs]'
# The man page and bash completion (a pip-installed wheel puts them in its prefix's share/).
install -D -m 644 dkr/data/man/dkr.1 /usr/local/share/man/man1/dkr.1
install -D -m 644 dkr/data/bash-completion/dkr /usr/local/share/bash-completion/completions/dkr
# The boot unit that mounts overlay machines again after a reboot, naming this dkr.
units=/etc/systemd/system
mkdir -p "$units/systemd-nspawn@.service.d"
sed "s|^ExecStart=/usr/local/bin/dkr |ExecStart=$(pwd)/.venv/bin/dkr |" \
    dkr/data/dkr-mount.service > "$units/dkr-mount.service"
cp dkr/data/systemd-nspawn@.service.d-dkr-mount.conf "$units/systemd-nspawn@.service.d/dkr-mount.conf"
if [ -d /run/systemd/system ]; then       # (systemd runs this system)
    systemctl daemon-reload && systemctl enable dkr-mount.service
else
    mkdir -p "$units/machines.target.wants"
    ln -sf ../dkr-mount.service "$units/machines.target.wants/dkr-mount.service"
fi
echo "dkr installed: $(.venv/bin/dkr --version)"
