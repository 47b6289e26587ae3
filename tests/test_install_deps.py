"""tools/install-system-deps.sh as `make test` runs it on a fresh box, with apt-get and dpkg-query stood in.

Real apt cannot be driven here (it would change the machine); the stand-ins record what
the script asks apt to do, which is what decides whether a held dpkg lock fails the run.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "install-system-deps.sh"


def _fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")  # every package missing
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/apt-calls\n')
    (bin_dir / "id").write_text("#!/bin/sh\necho 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def test_every_apt_call_waits_for_a_held_dpkg_lock_and_says_so(tmp_path):
    bin_dir = _fake_bin(tmp_path)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "VISIOND_APT_LOCK_WAIT_S": "42"}
    r = subprocess.run(["sh", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    calls = (tmp_path / "apt-calls").read_text().splitlines()
    assert [c.split()[2] for c in calls] == ["update", "install"]
    assert all("-o DPkg::Lock::Timeout=42" in c for c in calls), calls
    assert "waiting up to 42 s for the dpkg/apt lock" in r.stdout
    assert "mosquitto" in calls[1]
