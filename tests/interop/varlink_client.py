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
            # A release through the stock client: Deploy with "more" of a
            # new version, progress replies, then the outcome; History.
            v2 = os.path.join(work, "hello-v2")
            os.makedirs(v2)
            shutil.copy(os.path.join(target, "libhello.so"), v2)
            with open(os.path.join(module, "module.toml")) as f:
                text = f.read().replace('version = "0.1.0"', 'version = "0.2.0"', 1)
            text += '\n[rollout]\nstable_after = "100ms"\n'
            with open(os.path.join(v2, "module.toml"), "w") as f:
                f.write(text)
            replies = list(sup.Deploy(path=v2, _more=True))
            assert replies[-1]["outcome"] == "completed", replies[-1]
            assert replies[-1]["revision"] == 2, replies[-1]
            phases = [r["module"]["rollout"]["phase"] for r in replies[:-1] if r["module"].get("rollout")]
            assert "stabilizing" in phases, phases
            revisions = sup.History(name="hello")["revisions"]
            assert [(r["revision"], r["outcome"]) for r in revisions] == [(2, "active"), (1, "superseded")], revisions
            assert sup.Deploy(path=v2)["outcome"] == "unchanged"
            sup.Uninstall(name="hello")
    print("varlink interop: 3 passed, 0 failed")
finally:
    if emberd is not None:
        emberd.terminate()
        emberd.wait(timeout=30)
    shutil.rmtree(work, ignore_errors=True)
