#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine and nothing
# else: the CNCF distribution registry (package docker-registry) for the
# registry backend tests, util-linux's setpriv for the peer-uid tests, and
# erofs-utils (mkfs.erofs) for the mount tests, which build an EROFS image.
# FUSE itself needs no package: `blobmgr mount` runs as root and mounts
# through /dev/fuse with mount(2) (fusermount3, package fuse3, is only for
# mounting as another user).
# Idempotent; does nothing when everything is present.
set -euo pipefail
missing=()
command -v docker-registry >/dev/null 2>&1 || missing+=(docker-registry)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v mkfs.erofs >/dev/null 2>&1 || missing+=(erofs-utils)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need ${missing[*]}; run as root or install them" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  # --no-install-recommends: the registry binary only, no service is started.
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# A distro package may start its own registry service; the tests start their own.
command -v docker-registry >/dev/null
