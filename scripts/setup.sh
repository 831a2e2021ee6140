#!/usr/bin/env bash
# Installs everything Membrane needs on a fresh Debian 12 machine (run as root):
# system packages, kernel filesystems, a Python venv with the package and its dev tools.
# Idempotent and quick when nothing is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# prometheus: the metrics tests start their own server (127.0.0.1, a temporary directory);
# ipvsadm: bench/service_connect.py compares services with kube-proxy's IPVS mode;
# podman ... busybox-static: the CNI tests run real containers (runc: crun refuses the
# hybrid cgroup layout; catatonit: the pause binary of `podman kube play`'s pods;
# busybox-static: the test image, imported without a registry)
APT_PACKAGES=(clang llvm libbpf-dev bpftool libelf-dev make iproute2 iptables nftables
              iperf3 procps iputils-ping python3-venv prometheus ipvsadm
              podman runc containernetworking-plugins catatonit busybox-static)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    if [[ " ${missing[*]} " == *" prometheus "* ]] && command -v systemctl >/dev/null; then
        # the package starts a server on :9090 of every address; the tests need none
        systemctl disable --now prometheus >/dev/null 2>&1 || true
    fi
fi

# BPF programs pin under bpffs; tracepoints need tracefs.
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
if ! mountpoint -q /sys/kernel/tracing; then
    mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
fi

PY=${PYTHON:-python3}
stamp=.venv/.membrane-installed
if [[ ! -x .venv/bin/python ]]; then
    "$PY" -m venv .venv
fi
if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    echo "setup: installing Python dependencies into .venv"
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[dev]'
    touch "$stamp"
fi
