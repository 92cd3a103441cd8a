"""Stands in for the ppo stage in slurm/rlhf_ppo.sh: role=critic serves on trainer.ppo.port and answers
with its hostname; role=actor connects to remote_critic_rm.critic.ip:port (the first host of the
server's component, as the script found it) and reports what it reached."""
import os
import socket
import time

from tests.slurm.payloads import overrides, say


def critic(o: dict) -> int:
    port = int(o["trainer.ppo.port"])
    with socket.create_server(("0.0.0.0", port)) as srv:
        say(f"critic serving on port {port} (rendezvous {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']})")
        srv.settimeout(120)
        while True:  # until the job ends
            conn, _ = srv.accept()
            with conn:
                conn.sendall(f"critic on {socket.gethostname()}".encode())


def actor(o: dict) -> int:
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
    o = overrides()
    raise SystemExit(critic(o) if o["role"] == "critic" else actor(o))
