#!/bin/sh
# Reproduces the headline figure of BENCHMARKS.md "SMTP throughput vs Postfix": bulksend vs
# Postfix relaying vs the smtp-source ceiling, all to Postfix's smtp-sink on loopback, in one run.
#
#   benches/bench-postfix.sh [N] [extra bench args, e.g. --sizes 2048]
#
# Needs root (Postfix starts as root and drops privileges) and Debian's postfix package; this
# script installs nothing. N defaults to 100000 (the issue's figure); try 20000 for a quick run.
set -eu
cd "$(dirname "$0")/.."
if [ ! -x /usr/sbin/postfix ] || [ ! -x /usr/sbin/smtp-sink ] || [ ! -x /usr/sbin/smtp-source ]; then
    echo "postfix is not installed. Install it without a system configuration:" >&2
    echo "  echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections" >&2
    echo "  DEBIAN_FRONTEND=noninteractive apt-get install -y postfix" >&2
    exit 1
fi
if [ "$(id -u)" != 0 ]; then
    echo "run as root: the private Postfix instance must be started by root" >&2
    exit 1
fi
N="${1:-100000}"
[ $# -gt 0 ] && shift
exec cargo bench -p bulksend-benches --bench smtp -- --n "$N" "$@"
