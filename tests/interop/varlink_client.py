#!/usr/bin/env python3
"""Interop check: the reference Python `varlink` client (a stock Varlink
client, not ours) drives a real emberd.

Usage: varlink_client.py TARGET_DIR   (e.g. target/debug, after `cargo test`
built emberd and the example cdylibs). Exits non-zero on any mismatch.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import time

import varlink

root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
target = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(root, "target", "debug"))
work = tempfile.mkdtemp(prefix="ember-varlink-")
emberd = None
try:
    module = os.path.join(work, "hello")
    os.makedirs(module)
    shutil.copy(os.path.join(root, "examples", "hello", "module.toml"), module)
    shutil.copy(os.path.join(target, "libhello.so"), module)
    sock = os.path.join(work, "ember.sock")
    emberd = subprocess.Popen(
        [os.path.join(target, "emberd"), "--socket", sock, "--state-dir", os.path.join(work, "state")]
    )
    for _ in range(500):
        if os.path.exists(sock):
            break
        time.sleep(0.01)
    with varlink.Client("unix:" + sock) as client:
        with client.open("io.ember.Supervisor") as sup:
            assert sup.Install(path=module)["module"]["name"] == "hello"
            for _ in range(500):
                status = sup.Status(name="hello")["status"]
                if status["state"] == "running":
                    break
                time.sleep(0.01)
            assert status["state"] == "running", status
            assert status["pid"] > 0, status
            try:
                sup.Status(name="no-such-module")
                raise AssertionError("Status of an unknown module must fail")
            except varlink.VarlinkError as e:
                assert e.error() == "io.ember.Supervisor.ModuleNotFound", e.error()
            sup.Uninstall(name="hello")
            assert sup.List()["modules"] == []
            # Install with "more": one reply per state until the module
            # settles, then the install's own reply.
            states = [r["module"]["state"] for r in sup.Install(path=module, _more=True)]
            assert states[0] == "starting", states
            assert "running" in states, states
            assert states[-1] == "running", states
            sup.Uninstall(name="hello")
    print("varlink interop: 2 passed, 0 failed")
finally:
    if emberd is not None:
        emberd.terminate()
        emberd.wait(timeout=30)
    shutil.rmtree(work, ignore_errors=True)
