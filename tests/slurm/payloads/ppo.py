"""Stands in for `nemo-ft ppo critic.remote=true` in slurm/rlhf_ppo.sh: connects to
remote_critic_rm.critic.ip:port (the first host of the server's component, as the script found it) and
reports what it reached."""
import os
import socket
import time

from tests.slurm.payloads import overrides, say


def actor(o: dict) -> int:
    assert o["critic.remote"] == "true", o
    host, port = o["remote_critic_rm.critic.ip"], int(o["remote_critic_rm.critic.port"])
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.create_connection((host, port), timeout=5) as conn:
                reply = conn.recv(200).decode()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    say(f"actor (rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}) reached {host}:{port}: {reply}")
    return 0


if __name__ == "__main__":
    raise SystemExit(actor(overrides()))
