#!/bin/sh
# Idempotent set-up for sosplice on a Debian machine, run as root.
# Used by `make setup` (and so by `make test`, `make demo`, `make bench`).
#
#  1. Debian packages: bcc (python3-bpfcc), prometheus_client (for the
#     proxy's metrics), kernel headers for bcc, a C compiler and the UAPI
#     headers (tests/test_internals.py checks the ctypes layouts against
#     them), psutil (the benchmark's process accounting), and the peers
#     used by tests and benchmarks.
#  2. Kernel headers where the running kernel ships none (docs/kernel-notes.md):
#     bcc wants /lib/modules/$(uname -r)/{build,source}; Debian's generic
#     linux-headers-amd64 works for UAPI-only BPF code, which is all we write.
#  3. A virtualenv made from Debian's python3 with system site-packages, so
#     that it sees bcc, with the package installed editable.
set -eu

cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

PKGS="python3-bpfcc python3-prometheus-client python3-psutil python3-venv python3-pip linux-headers-amd64 gcc libc6-dev linux-libc-dev iproute2 tmux socat curl haproxy iperf3"
missing=""
for p in $PKGS; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
	echo "setup: installing Debian packages:$missing"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -q >/dev/null
	apt-get install -y -q --no-install-recommends $missing >/dev/null
fi

# Kernel headers for bcc (only where the running kernel has none).
KREL=$(uname -r)
KDIR=/lib/modules/$KREL
if [ ! -e "$KDIR/build/include/generated/autoconf.h" ] && [ ! -e /sys/kernel/kheaders.tar.xz ]; then
	arch=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -1)
	common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1)
	if [ -z "$arch" ] || [ -z "$common" ]; then
		echo "setup: no linux-headers-*-amd64/-common under /usr/src; install linux-headers-amd64" >&2
		exit 1
	fi
	mkdir -p "$KDIR"
	ln -sfn "$arch" "$KDIR/build"
	ln -sfn "$common" "$KDIR/source"
	echo "setup: bcc headers: $KDIR/build -> $arch"
fi

# The BPF filesystem, where engines pin their maps for splicectl.
if ! mount | grep -q " /sys/fs/bpf type bpf"; then
	mount -t bpf bpf /sys/fs/bpf 2>/dev/null || true
fi

if [ ! -x "$VENV/bin/python" ]; then
	/usr/bin/python3 -m venv --system-site-packages "$VENV"
fi
stamp="$VENV/.installed"
if [ ! -e "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
	log="$VENV/setup.log"
	if ! { "$VENV/bin/pip" install -q --upgrade pip && "$VENV/bin/pip" install -q -e '.[test,bench]'; } >"$log" 2>&1; then
		cat "$log" >&2
		echo "setup: pip install failed (log above, also in $log)" >&2
		exit 1
	fi
	touch "$stamp"
fi
"$VENV/bin/python" -c "import bcc, prometheus_client, sosplice" || {
	echo "setup: the virtualenv cannot import bcc, prometheus_client and sosplice" >&2
	exit 1
}
