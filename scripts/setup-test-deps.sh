#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine and nothing
# else: the CNCF distribution registry (package docker-registry) for the
# registry backend tests, apache2-utils' htpasswd for the registries with
# basic auth (bcrypt htpasswd entries), util-linux's setpriv for the
# peer-uid tests, bsdutils' script for the CLI's progress-bar test (a
# pseudo-terminal), the openssl command for the HTTPS registry tests (a CA and a
# server certificate made per test), and systemd's systemd-socket-activate
# and systemd-analyze for the lifecycle tests (package systemd; installing it
# starts nothing in a container), and erofs-utils (mkfs.erofs) for the mount
# tests, which build an EROFS image.
# FUSE itself needs no package: `blobmgr mount` runs as root and mounts
# through /dev/fuse with mount(2) (fusermount3, package fuse3, is only for
# mounting as another user).
# Idempotent; does nothing when everything is present.
set -euo pipefail
missing=()
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
command -v htpasswd >/dev/null 2>&1 || missing+=(apache2-utils)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v script >/dev/null 2>&1 || missing+=(bsdutils)
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
{ command -v systemd-socket-activate && command -v systemd-analyze; } >/dev/null 2>&1 ||
  missing+=(systemd)
command -v mkfs.erofs >/dev/null 2>&1 || missing+=(erofs-utils)
# `setup-test-deps.sh bench` (make bench): also what scripts/bench.sh's
# registry scenario runs beside the daemon.
if [ "${1:-}" = bench ]; then
  command -v curl >/dev/null 2>&1 || missing+=(curl)
  [ -x /usr/bin/time ] || missing+=(time)
  command -v ss >/dev/null 2>&1 || missing+=(iproute2)
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: the binaries only, no service is started.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# A distro package may start its own registry service; the tests start their own.
command -v docker-registry >/dev/null
command -v systemd-socket-activate >/dev/null
command -v mkfs.erofs >/dev/null
command -v script >/dev/null
