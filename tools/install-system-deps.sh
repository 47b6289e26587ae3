#!/bin/sh
# Debian packages visiond's tests and demo need; installs only what is missing.
set -eu
PKGS="mosquitto ffmpeg python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-base gstreamer1.0-plugins-good
gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav prometheus systemd chromium chromium-driver"
missing=""
for p in $PKGS; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing="$missing $p"
  fi
done
if [ -z "$missing" ]; then
  echo "system packages: all present"
  exit 0
fi
echo "system packages: installing$missing"
SUDO=""
if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
# A fresh box often runs an unattended upgrade that holds the dpkg lock: wait for it (bounded), don't fail.
LOCK_WAIT_S="${VISIOND_APT_LOCK_WAIT_S:-600}"
LOCK="-o DPkg::Lock::Timeout=$LOCK_WAIT_S"
echo "system packages: waiting up to $LOCK_WAIT_S s for the dpkg/apt lock if another apt is running"
# shellcheck disable=SC2086
$SUDO apt-get $LOCK update -q || echo "apt-get update failed; trying with the cached package lists"
# shellcheck disable=SC2086
$SUDO apt-get $LOCK install -y -q --no-install-recommends $missing
